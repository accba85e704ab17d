"""Building a knowledge base: triples -> KV records -> sentence embeddings -> KB directory + HiKVP index.

    triples.py   Triple, readers and writers of TSV / CSV / JSONL / N-Triples / Turtle / Parquet
    records.py   Triple -> KVRecord (key text, value text), relation nouns
    encoder.py   the sentence encoder (embeddings)
    store.py     KnowledgeBase: the versioned, crash-safe KB directory (live add / remove)
    index.py     the HiKVP tree (k-means levels over the keys)
    ray_build.py the same build on Ray Data, for very large KGs
"""
