"""The model side: a stock Hugging Face LLM reading a KB through its attention.

    llm.py        loading the frozen base LLM (GGUF or Hugging Face folder)
    chat.py       the chat prompt format, left padding and where an answer ends (one home)
    adapter.py    KBAdapter: the trained key / value projectors and KB query heads (save / load)
    kb_inputs.py  KBInputs (what one call reads of a KB) and how it reaches the layers (kwarg or use_kb)
    attention.py  the KB attention kernel, registered in transformers' AttentionInterface
    pruning.py    HiKVP search over the tree at inference
    values.py     the value path: what an attended KB entry writes (sentence values; copy values + copy logits)
    decoding.py   value decoding: the answer names the cited value as stored, once, then ends (a LogitsProcessor)
    atlaskv.py    AtlasKV (kb_inputs / ask / generate / stream) and Answer (text + cited triples)
"""
