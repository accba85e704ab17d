"""atlaskv: plug a knowledge graph into a frozen LLM's attention (AtlasKV / KBLaM).

Data flow, one module per step:
    kg (triples) -> kg2kv (key/value records) -> encoder (embeddings) -> store (KB directory)
"""
from __future__ import annotations

__version__ = "0.1.0"

# Lazy attributes keep `import atlaskv` (and `atlaskv --help`) free of torch/transformers imports.
_EXPORTS = {
    "Triple": "kg", "read_triples": "kg", "write_triples": "kg", "read_eval_set": "kg",
    "KGFormatError": "kg",
    "KVRecord": "kg2kv", "RelationNouns": "kg2kv", "triples_to_records": "kg2kv",
    "load_encoder": "encoder",
    "KnowledgeBase": "store", "KBError": "store",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'atlaskv' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
