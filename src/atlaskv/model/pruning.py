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
  both      the union of both selections at every level. The KB query heads score only the `shortlist`
            candidates of a level that are nearest the question (a cascade: the cheap cosine narrows, the
            layer's own query re-ranks); the question's own top-k still comes from every candidate.
Decode steps reuse the prefill's selection (`reuse`), or search again with the new token's query as the
reference does.

Within one forward call the ten KB layers walk much the same part of the tree, so what does not depend on the
layer is done once (SearchMemo): the question's cosine to every centroid, and each leaf row read from the
memory map. At 10^7 entries these were two thirds of the first token's time (docs/experiments.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from atlaskv.defaults import PRUNE_ROUTE, PRUNE_SHORTLIST, PRUNE_TOP_K
from atlaskv.kb.index import Hierarchy, gather_children

ROUTES = ("kbq", "question", "both")


@dataclass
class PruneConfig:
    top_k: tuple[int, int, int] = PRUNE_TOP_K   # defaults.py says why these
    route: str = PRUNE_ROUTE
    per_head: bool = False
    reuse: bool = True
    scale_n: str = "selected"   # N of the length correction: "selected" leaves (reference) or the whole "kb"
    shortlist: int = PRUNE_SHORTLIST  # route both: candidates per level the KB query scores (0: all of them)

    def __post_init__(self):
        self.top_k = tuple(int(k) for k in self.top_k)
        self.shortlist = int(self.shortlist)
        if self.shortlist < 0:
            raise ValueError(f"shortlist must be >= 0 (0: the KB query scores every candidate), got {self.shortlist}")
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
    inv_std: torch.Tensor | None = None  # [B, G, n] the keys' LayerNorm scale, when gather() knew the adapter
    # the distinct leaves behind keys / values / inv_std ([U, d_in], [U, d_in], [U]) and where each slot reads
    # them ([B, G, n], 0 at padding): a layer projects each distinct leaf once, however many samples kept it
    unique: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    index: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.positions.shape[-1]

    def row(self, b: int) -> "Selection":
        """Sample b's selection as a prefill of that sample alone lays it out: its leaves, padded only to its
        own longest group, with what the layers cached for it (projected leaves, decode bias)."""
        n = max(1, int(self.valid[b].sum(-1).max()))

        def cut(t: torch.Tensor, axis: int) -> torch.Tensor:
            return t[b:b + 1].narrow(axis, 0, n)
        cache = {}
        for key, got in self.cache.items():
            if key[0] == "proj":       # ([B, H, n, D], [B, H, n, D])
                cache[key] = tuple(cut(t, 2) for t in got)
            elif key[0] == "decode":   # [B, H, 1, n]
                cache[key] = cut(got, 3)
        return Selection(cut(self.positions, 2), cut(self.keys, 2), cut(self.values, 2), cut(self.valid, 2), cache,
                         None if self.inv_std is None else cut(self.inv_std, 2))  # its projections are cached


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

    def centroid_inv_norm(self, level: str) -> torch.Tensor:
        key = ("norm", level)
        if key not in self._norm_cache:
            self._norm_cache[key] = 1 / getattr(self, level).norm(dim=-1).clamp_min(1e-12)
        return self._norm_cache[key]

    def fetch(self, positions: np.ndarray, which: str) -> torch.Tensor:
        src = self.keys if which == "keys" else self.values
        return torch.from_numpy(src.take(positions)).to(self.device)


class SearchMemo:
    """What the KB layers of one forward call share while each searches the tree: leaf rows already read
    (keys, values) and, per sample, the question's cosine to every root and inter centroid. Lives in the
    call's state (KBCallState), so nothing outlives the call; memory: the rows read, ~0.1 GB at 10^7."""

    def __init__(self, kb: PrunedKB):
        self.kb = kb
        self.slots: dict[str, np.ndarray] = {}      # per kind: row position -> 1 + index into `rows`, 0 = unread
        self.rows: dict[str, torch.Tensor] = {}
        self.used: dict[str, int] = {}
        self.cosines: dict[tuple, torch.Tensor] = {}

    def read(self, positions: np.ndarray, which: str) -> torch.Tensor:
        """Where the rows at `positions` sit in `self.rows[which]` (long [n]); only rows no layer has read
        yet come from disk."""
        positions = np.asarray(positions, np.int64)
        if which not in self.slots:  # calloc'd: only the pages of rows actually read are touched
            self.slots[which] = np.zeros(self.kb.rows, np.int32)
            self.used[which] = 0
        slot = self.slots[which]
        missing = np.unique(positions[slot[positions] == 0])
        if len(missing):
            new = self.kb.fetch(missing, which)
            used = self.used[which]
            buf = self.rows.get(which)
            if buf is None or used + len(new) > len(buf):
                # grown by a quarter: the layers of a call add fewer rows each (peak memory, not copies, counts)
                grown = torch.empty(max(used + len(new) + (used + len(new)) // 4, 1024), new.shape[1], dtype=new.dtype,
                                    device=new.device)
                if buf is not None:
                    grown[:used] = buf[:used]
                buf = self.rows[which] = grown
            buf[used:used + len(new)] = new
            slot[missing] = np.arange(used + 1, used + len(new) + 1, dtype=np.int32)
            self.used[which] = used + len(new)
        return torch.from_numpy(slot[positions].astype(np.int64) - 1).to(self.rows[which].device)

    def take(self, positions: np.ndarray, which: str) -> torch.Tensor:
        """float32 rows at `positions` [n, d] ("keys" or "values")."""
        index = self.read(positions, which)
        return self.rows[which][index]

    def key_cosine(self, index: torch.Tensor, sample: int, qemb: torch.Tensor) -> torch.Tensor:
        """[n]: the question's cosine to the key rows at `index` (from read); each row's once per call."""
        cos, done = self.cosines.get(("keys", sample), (None, 0))
        used = self.used["keys"]
        if done < used:
            q = torch.nn.functional.normalize(qemb.to(torch.float32), dim=-1)
            new = (self.rows["keys"][done:used] @ q) * self.key_inv_norms(used)[done:used]
            cos = new if cos is None else torch.cat([cos[:done], new])
            self.cosines[("keys", sample)] = (cos, used)
        return cos[index]

    def key_inv_norms(self, used: int) -> torch.Tensor:
        """1 / norm of the first `used` key rows read, each row's computed once per call: every sample of a
        batch takes the cosine to the rows the others read too (8 questions normalised the same rows 160
        times a prefill at 10^6)."""
        inv, done = self.cosines.get("key_inv_norms", (None, 0))
        if done < used:
            new = 1 / self.rows["keys"][done:used].norm(dim=-1).clamp_min(1e-12)
            inv = new if inv is None else torch.cat([inv[:done], new])
            self.cosines["key_inv_norms"] = (inv, used)
        return inv

    def cosine(self, level: str, sample: int, qemb: torch.Tensor) -> torch.Tensor:
        """[n_level]: the question's cosine to every centroid of `level` ("roots" or "inters")."""
        key = (level, sample)
        if key not in self.cosines:
            q = torch.nn.functional.normalize(qemb.to(torch.float32), dim=-1)
            self.cosines[key] = (getattr(self.kb, level) @ q) * self.kb.centroid_inv_norm(level)
        return self.cosines[key]


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


def search(kb: PrunedKB, adapter, scorer: LayerScorer | None, qemb: torch.Tensor | None,
           route: str, memo: SearchMemo | None = None, sample: int = 0) -> list[torch.Tensor]:
    """Positions of the kept leaves for one sample: one tensor [n_g] per group (1, or H if per_head)."""
    cfg = kb.config
    memo = memo or SearchMemo(kb)
    k_r, k_i, k_l = cfg.top_k
    root_off, root_ch, inter_off, inter_ch = kb.csr
    use_kbq, use_question = route in ("kbq", "both"), route in ("question", "both")
    shortlist = cfg.shortlist if route == "both" else 0

    def picks(k: int, cos: torch.Tensor | None, kbq_scores) -> list[torch.Tensor]:
        """Each route's top k of a level's candidates, [G, k] indices into them. kbq_scores(among) scores
        the candidates at `among` (None: all) with the layer's KB query."""
        out = []
        if use_kbq:
            among = cos.topk(shortlist).indices if shortlist and len(cos) > shortlist else None
            scores = kbq_scores(among)
            top = scores.topk(min(k, scores.shape[-1]), -1).indices
            out.append(top if among is None else among[top])
        if use_question:
            out.append(cos.topk(min(k, len(cos))).indices[None])
        return out

    roots = torch.arange(len(kb.roots), device=kb.roots.device)
    if len(roots) > k_r:
        cos = memo.cosine("roots", sample, qemb) if use_question else None
        inv = kb.centroid_inv_std(adapter, "roots")
        kept = picks(k_r, cos, lambda i: scorer.route_scores(
            kb.roots if i is None else kb.roots[i], inv if i is None else inv[i], cfg.per_head))
        roots = torch.unique(torch.cat([p.flatten() for p in kept]))
    inters = gather_children(root_off, root_ch, roots)
    if len(inters) > k_i:
        cos = memo.cosine("inters", sample, qemb)[inters] if use_question else None
        inv = kb.centroid_inv_std(adapter, "inters")

        def kbq_inters(i):
            sub = inters if i is None else inters[i]
            return scorer.route_scores(kb.inters[sub], inv[sub], cfg.per_head)
        kept = picks(k_i, cos, kbq_inters)
        inters = inters[torch.unique(torch.cat([p.flatten() for p in kept]))]
    leaves = gather_children(inter_off, inter_ch, inters)
    if kb.live_t is not None:
        leaves = leaves[kb.live_t[leaves]]
    if len(leaves) == 0:
        return [leaves]
    at = memo.read(leaves.cpu().numpy(), "keys")
    cos = memo.key_cosine(at, sample, qemb) if use_question else None

    def kbq_leaves(i):  # only the shortlist's rows are gathered (all of them without one)
        pos = leaves if i is None else leaves[i]
        e = memo.rows["keys"][at if i is None else at[i]]
        return scorer.route_scores(e, kb.leaf_inv_std(adapter, pos, e), cfg.per_head)
    groups = picks(k_l, cos, kbq_leaves)     # every route keeps its own k_L per group
    if len(groups) == 2:  # both: kbq rows [G, k] + question row [1, k] -> per group union
        q_pick = groups[1][0]
        return [leaves[torch.unique(torch.cat([g, q_pick]))] for g in groups[0]]
    return [leaves[g] for g in groups[0]]


def gather(kb: PrunedKB, picks: list[list[torch.Tensor]], n_groups: int, memo: SearchMemo | None = None,
           adapter=None) -> Selection:
    """Pad per-sample, per-group picks into [B, G, n] and read only those rows' keys and values (and, given
    the adapter, their key LayerNorm scales from the per-position cache the search filled)."""
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
    inv_std = None if adapter is None else torch.ones(B, n_groups, n, device=kb.device)
    unique = index = None
    if len(uniq):
        vmask = valid.to(kb.device)
        inverse = torch.from_numpy(inverse).to(kb.device)
        read = memo.take if memo is not None else lambda pos, which: kb.fetch(pos, which)
        unique_keys = read(uniq, "keys")
        keys[vmask] = unique_keys[inverse]
        fetched = read(uniq, "values")  # values may be wider than keys (token-value adapters)
        values = torch.zeros(B, n_groups, n, fetched.shape[-1], device=kb.device)
        values[vmask] = fetched[inverse]
        if adapter is not None:
            at = torch.from_numpy(uniq).to(kb.device)
            unique_inv = kb.leaf_inv_std(adapter, at, unique_keys)
            inv_std[vmask] = unique_inv[inverse]
            unique = (unique_keys, fetched, unique_inv)
            index = torch.zeros(B, n_groups, n, dtype=torch.long, device=kb.device)
            index[vmask] = inverse
    else:
        values = torch.zeros_like(keys)
    return Selection(pos.to(kb.device), keys, values, valid.to(kb.device), inv_std=inv_std, unique=unique, index=index)
