"""KBView: the one seam between a knowledge base and the model.

Whatever holds the facts (a KB directory on disk, or the arrays of an evaluation pool), the model reads it
through the same few things: row-addressable key and value embeddings, which rows are live, the HiKVP tree
over the rows (optional), and the triples / value texts behind any rows it cites. `AtlasKV.kb_inputs` turns a
view into the tensors one forward call reads (flat: every live row; pruned: the tree, rows read on demand).

    kb.view() / KBView.of(kb)         a KnowledgeBase version: memory-mapped embeddings, its stored tree
    KBView.from_arrays(k, v, triples) in-memory rows (evaluation pools, benchmarks), tree optional
    view.without(rows)                the same view with some rows removed (the same tree, rows tombstoned)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from atlaskv.kb.records import RelationNouns
from atlaskv.kb.triples import Triple

if TYPE_CHECKING:  # the tree's module needs torch; a view only carries one
    from atlaskv.kb.index import Hierarchy


class ArraySource:
    """Rows of an in-memory (or memory-mapped) [M, d] array, read as float32 only where asked."""

    def __init__(self, array):
        self.array = array

    def take(self, positions: np.ndarray) -> np.ndarray:
        order = np.argsort(positions)  # sorted reads are sequential on a memory map
        out = np.empty((len(positions), self.array.shape[1]), np.float32)
        out[order] = self.array[positions[order]]
        return out


@dataclass(frozen=True)
class KBView:
    keys: object                                   # .take(positions) -> float32 [n, d_in]
    values: object                                 # .take(positions) -> float32 [n, d_in]
    rows: int                                      # rows addressable by position
    triples: Callable[[np.ndarray], list[Triple]]  # positions -> the triples stored there
    value_texts: Callable[[np.ndarray], list[str]]
    live: np.ndarray | None = None                 # [rows] bool, False for removed rows (None: all live)
    tree: Hierarchy | None = None                  # HiKVP tree whose leaves are row positions
    cache_key: tuple | None = None                 # (path, version) of a KB on disk: what may be cached
    # () -> {relation: its tail-masked key template, "the <noun> of {entity}"}: every relation the KB knows
    key_templates: Callable[[], dict[str, str]] | None = None

    @property
    def size(self) -> int:
        """Live rows: the N of the KB's length correction."""
        return self.rows if self.live is None else int(self.live.sum())

    def live_positions(self) -> np.ndarray:
        return np.arange(self.rows, dtype=np.int64) if self.live is None else np.flatnonzero(self.live)

    @classmethod
    def of(cls, kb) -> "KBView":
        """The live version of a KnowledgeBase. The tree on disk names entry ids; the view's leaves are row
        positions (mapped once here)."""
        table = kb.table()
        tree = kb.hierarchy()
        if tree is not None and not table.identity:
            tree = tree.map_leaves(table.positions)
        templates = {k.split("\t", 1)[1]: t for k, t in kb.manifest["relation_templates"].items()
                     if k.startswith("tail\t")}
        return cls(table.keys, table.values, len(table), table.triples, table.value_texts, table.live, tree,
                   cache_key=(str(kb.path), kb.version), key_templates=lambda: templates)

    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: np.ndarray, triples: Sequence[Triple],
                    tree: Hierarchy | None = None) -> "KBView":
        triples = list(triples)

        @functools.cache
        def templates() -> dict[str, str]:  # as the records of these triples were keyed (rules: KG2KV's default)
            nouns = RelationNouns()
            return {r: nouns.template(r, "tail") for r in sorted({t.relation for t in triples})}
        return cls(ArraySource(keys), ArraySource(values), len(triples),
                   lambda pos: [triples[int(p)] for p in pos], lambda pos: [triples[int(p)].tail for p in pos],
                   tree=tree, key_templates=templates)

    def without(self, positions: np.ndarray) -> "KBView":
        """These rows removed, nothing else changed (the tree keeps them as tombstoned leaves)."""
        live = np.ones(self.rows, bool) if self.live is None else self.live.copy()
        live[np.asarray(positions, np.int64)] = False
        return replace(self, live=live, cache_key=None)
