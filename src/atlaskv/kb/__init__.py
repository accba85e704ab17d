"""Building a knowledge base: triples -> KV records -> sentence embeddings -> KB directory + HiKVP index.

    triples.py   Triple, KGFormatError: read_triples / iter_triples / read_eval_set / write_triples
    formats.py   format by format: TSV / CSV / JSONL / Parquet readers and writers, detection, field cleaning
    rdf.py       the N-Triples / Turtle readers (rdflib)
    records.py   Triple -> KVRecord (key text, value text), relation nouns
    encoder.py   the sentence encoder (embeddings)
    layout.py    the KB directory format: files, manifest, durable writes, atomic swap, checks
    table.py     EmbeddingTable: every stored row by position, embeddings memory-mapped
    view.py      KBView: what a model reads of a KB (rows, live mask, tree, cited triples): the seam to model/
    store.py     KnowledgeBase: the versioned, crash-safe KB directory (build, live add / remove, verify)
    index.py     the HiKVP tree (k-means levels over the keys), and its files in a KB directory
    ray_build.py the same build on Ray Data, for very large KGs (KnowledgeBase.build(engine="ray"))

Each module imports only modules above it in its chain (formats <- rdf <- triples <- records <- layout <-
table / view / index <- store <- ray_build); store reaches the Ray engine through store.BUILD_ENGINES, where
ray_build registers itself when imported here.
"""
from atlaskv.kb import ray_build  # noqa: F401  (registers engine="ray"; imports no Ray, no torch)
