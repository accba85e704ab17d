"""atlaskv: plug a knowledge graph into a frozen LLM's attention (AtlasKV / KBLaM).

The data flow is the folder layout (docs/architecture.md):
    kb/          triples -> KV records -> embeddings -> KB directory (store) + HiKVP index -> KBView
    model/       base LLM + trained adapter + KB attention (flat or pruned) + value path -> answer with citations
    train/       the adapter's training: data (records, batches) and the loop
    evaluation/  grounding, answer quality, baselines (rag, icl, zeroshot), scale benchmarks
    serve/       the OpenAI-compatible HTTP server and its web page;   cli/: the typer CLI over all of it
"""
from __future__ import annotations

__version__ = "0.1.0"

# Lazy attributes keep `import atlaskv` (and `atlaskv --help`) free of torch/transformers imports.
_EXPORTS = {
    "Triple": "kb.triples", "read_triples": "kb.triples", "write_triples": "kb.triples",
    "read_eval_set": "kb.triples", "KGFormatError": "kb.triples",
    "KVRecord": "kb.records", "RelationNouns": "kb.records", "triples_to_records": "kb.records",
    "load_encoder": "kb.encoder",
    "KnowledgeBase": "kb.store", "KBError": "kb.store", "UpdateResult": "kb.store",
    "AtlasKV": "model.atlaskv", "Answer": "model.atlaskv",
    "KBAdapter": "model.adapter", "AdapterError": "model.adapter",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'atlaskv' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
