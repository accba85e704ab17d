"""The model side: a stock Hugging Face LLM reading a KB through its attention.

    llm.py        loading the frozen base LLM (GGUF or Hugging Face folder)
    adapter.py    KBAdapter: the trained key / value projectors and KB query heads (save / load)
    attention.py  the KB attention kernel, registered in transformers' AttentionInterface
    pruning.py    HiKVP search over the tree at inference
    values.py     the value path: what an attended KB entry writes (sentence value, copy values, copy logits)
    atlaskv.py    AtlasKV (ask / generate / stream) and Answer (text + cited triples)
"""
