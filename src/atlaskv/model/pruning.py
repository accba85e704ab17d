"""HiKVP online search (method.md §5.4, with §5.5's id bugs fixed): which KB leaves one KB layer attends to.

At a KB layer, for each sample: score the root centroids, keep the top k_R; score their inter children,
keep the top k_I; score those clusters' live leaves, keep the top k_L. Only the kept leaves' base
embeddings are read (memory-mapped on disk) and only they enter the KB softmax. Every level works on
positions in the served KB, so the kept values are always the kept keys' own values.

Scoring routes (`route`):
  kbq       the paper: the layer's KB query heads against the adapter-projected centroid keys; the
            softmax over candidates is summed over heads and prompt tokens (per_head: summed over tokens
            only, each head keeps its own top-k; the next level reads the union);
  question  the sentence encoder's embedding of the question, cosine to the base-space centroids: one
            search per forward call shared by all layers (a retriever walking the same tree);
  both      the union of both selections at every level.
Decode steps reuse the prefill's selection (`reuse`), or search again with the new token's query as the
reference does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from atlaskv.defaults import PRUNE_ROUTE, PRUNE_TOP_K
from atlaskv.kb.index import Hierarchy, gather_children

ROUTES = ("kbq", "question", "both")


@dataclass
class PruneConfig:
    top_k: tuple[int, int, int] = PRUNE_TOP_K   # defaults.py says why these
    route: str = PRUNE_ROUTE
    per_head: bool = False
    reuse: bool = True
    scale_n: str = "selected"   # N of the length correction: "selected" leaves (reference) or the whole "kb"

    def __post_init__(self):
        self.top_k = tuple(int(k) for k in self.top_k)
        if len(self.top_k) != 3 or min(self.top_k) < 1:
            raise ValueError(f"top_k must be three positive ints (roots, inter, leaves), got {self.top_k}")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        if self.scale_n not in ("selected", "kb"):
            raise ValueError(f"scale_n must be 'selected' or 'kb', got {self.scale_n!r}")


def _tensor(a, dtype, device) -> torch.Tensor:
    """A torch view of a (possibly memory-mapped) array: no copy when dtype and device already match."""
    return torch.from_numpy(np.asarray(a, dtype)).to(device)


@dataclass
class Selection:
    positions: torch.Tensor   # [B, G, n] long, -1 where a sample has fewer than n leaves
    keys: torch.Tensor        # [B, G, n, d_in] base key embeddings (0 at padding)
    values: torch.Tensor      # [B, G, n, d_in]
    valid: torch.Tensor       # [B, G, n] bool
    cache: dict = field(default_factory=dict)  # per layer: the leaves' projected keys and values


@dataclass
class PrunedKB:
    """A KB served through its HiKVP tree; `size` is the number of live leaves."""
    hierarchy: Hierarchy      # leaves = row positions of keys/values
    keys: object              # .take(positions) -> float32 [n, d] (a KBView's rows)
    values: object
    live: np.ndarray | None = None     # [rows] bool, False for removed entries (never attended)
    config: PruneConfig = field(default_factory=PruneConfig)
    device: str | torch.device = "cpu"
    rows: int | None = None            # rows of keys/values (default: from live, else the largest leaf + 1)
    size: int | None = None            # live leaves, when the caller knows it (else counted)

    def __post_init__(self):
        h, dev = self.hierarchy, self.device
        with warnings.catch_warnings():  # memory-mapped tree arrays are read-only; torch only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.roots = _tensor(h.roots, np.float32, dev)
            self.inters = _tensor(h.inters, np.float32, dev)
            self.csr = tuple(_tensor(a, np.int64, dev) for a in
                             (h.root_offsets, h.root_children, h.inter_offsets, h.inter_children))
        self.live_t = None if self.live is None else torch.from_numpy(np.asarray(self.live, bool)).to(dev)
        if self.rows is None:
            self.rows = len(self.live) if self.live is not None else int(np.max(h.inter_children)) + 1
        if self.size is None:
            self.size = h.num_leaves if self.live is None else int(self.live[h.inter_children].sum())
        self._norm_cache: dict = {}

    def centroid_inv_std(self, adapter, level: str) -> torch.Tensor:
        key = (level, id(adapter))
        if key not in self._norm_cache:  # the adapter's key LayerNorm scale, once per centroid
            self._norm_cache[key] = adapter.key_inv_std(getattr(self, level))
        return self._norm_cache[key]

    def leaf_inv_std(self, adapter, positions: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The key LayerNorm scale of leaves, remembered per position: it is the same at every layer and
        call, and at 10^7 entries recomputing it for each layer's candidates dominated the prefill."""
        key = ("leaves", id(adapter))
        cache = self._norm_cache.get(key)
        if cache is None:  # 0 = not yet known (a scale is never 0); calloc'd, so only touched pages cost memory
            cache = self._norm_cache[key] = torch.from_numpy(np.zeros(self.rows, np.float32)).to(self.device)
        got = cache[positions]
        miss = got == 0
        if miss.any():
            got[miss] = adapter.key_inv_std(e[miss]).to(got.dtype)
            cache[positions[miss]] = got[miss]
        return got

    def fetch(self, positions: np.ndarray, which: str) -> torch.Tensor:
        src = self.keys if which == "keys" else self.values
        return torch.from_numpy(src.take(positions)).to(self.device)


class LayerScorer:
    """Scores base embeddings for one layer and one sample through the pulled-back KB query (exact)."""

    def __init__(self, q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scaling: float,
                 token_weight: torch.Tensor | None):
        # q [H, T, D] (fp32), w [H, D, d_in], b [H, D] already at query-head width
        self.u = torch.einsum("htd,hdi->hti", q, w)
        self.c = torch.einsum("htd,hd->ht", q, b)
        self.scaling = scaling
        self.token_weight = token_weight  # [T] 1 for real prompt tokens, 0 for padding

    def logits(self, e: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
        return (self.u @ e.T + self.c[..., None]) * inv_std * self.scaling        # [H, T, n]

    def route_scores(self, e: torch.Tensor, inv_std: torch.Tensor, per_head: bool) -> torch.Tensor:
        """[G, n]: the softmax over candidates summed over prompt tokens (and heads unless per_head)."""
        p = torch.softmax(self.logits(e, inv_std), -1)
        if self.token_weight is not None:
            p = p * self.token_weight[None, :, None]
        p = p.sum(1)
        return p if per_head else p.sum(0, keepdim=True)


def _cosine(qe: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(qe, dim=-1))[None]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[G, n] -> candidate indices kept by any row (sorted, unique)."""
    k = min(k, scores.shape[-1])
    return torch.unique(scores.topk(k, -1).indices)


def search(kb: PrunedKB, adapter, scorer: LayerScorer | None, qemb: torch.Tensor | None,
           route: str) -> list[torch.Tensor]:
    """Positions of the kept leaves for one sample: one tensor [n_g] per group (1, or H if per_head)."""
    cfg = kb.config
    k_r, k_i, k_l = cfg.top_k
    root_off, root_ch, inter_off, inter_ch = kb.csr

    def pick(e, inv_std, k, final=False):
        rows = []
        if route in ("kbq", "both"):
            rows.append(scorer.route_scores(e, inv_std, cfg.per_head))
        if route in ("question", "both"):
            rows.append(_cosine(qemb, e))
        if final:
            return rows
        return torch.unique(torch.cat([_top(r, k) for r in rows]))

    roots = torch.arange(len(kb.roots), device=kb.roots.device)
    if len(roots) > k_r:
        roots = pick(kb.roots, kb.centroid_inv_std(adapter, "roots"), k_r)
    inters = gather_children(root_off, root_ch, roots)
    if len(inters) > k_i:
        inv = kb.centroid_inv_std(adapter, "inters")[inters]
        inters = inters[pick(kb.inters[inters], inv, k_i)]
    leaves = gather_children(inter_off, inter_ch, inters)
    if kb.live_t is not None:
        leaves = leaves[kb.live_t[leaves]]
    if len(leaves) == 0:
        return [leaves]
    e = kb.fetch(leaves.cpu().numpy(), "keys")
    rows = pick(e, kb.leaf_inv_std(adapter, leaves, e), k_l, final=True)
    groups = []
    for r in rows:  # every route keeps its own k_L per group; "both" unites them
        k = min(k_l, r.shape[-1])
        groups.append(r.topk(k, -1).indices)                                   # [G, k]
    if len(groups) == 2:  # both: kbq rows [G, k] + question row [1, k] -> per group union
        q_pick = groups[1][0]
        groups = [torch.unique(torch.cat([g, q_pick])) for g in groups[0]]
        return [leaves[g] for g in groups]
    return [leaves[g] for g in groups[0]]


def gather(kb: PrunedKB, picks: list[list[torch.Tensor]], n_groups: int) -> Selection:
    """Pad per-sample, per-group picks into [B, G, n] and read only those rows' keys and values."""
    B = len(picks)
    n = max(1, max(len(g) for p in picks for g in p))
    pos = torch.full((B, n_groups, n), -1, dtype=torch.long)
    for b, groups in enumerate(picks):
        for g in range(n_groups):
            sel = groups[g if len(groups) > 1 else 0]
            pos[b, g, :len(sel)] = sel.cpu()
    valid = pos >= 0
    flat = pos[valid].numpy()
    uniq, inverse = np.unique(flat, return_inverse=True)
    d = kb.roots.shape[-1]
    keys = torch.zeros(B, n_groups, n, d, device=kb.device)
    if len(uniq):
        vmask = valid.to(kb.device)
        inverse = torch.from_numpy(inverse).to(kb.device)
        keys[vmask] = kb.fetch(uniq, "keys")[inverse]
        fetched = kb.fetch(uniq, "values")  # values may be wider than keys (token-value adapters)
        values = torch.zeros(B, n_groups, n, fetched.shape[-1], device=kb.device)
        values[vmask] = fetched[inverse]
    else:
        values = torch.zeros_like(keys)
    return Selection(pos.to(kb.device), keys, values, valid.to(kb.device))
