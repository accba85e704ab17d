"""What one forward / generate call reads of a KB (KBInputs), and how it reaches the attention layers.

How the KB travels (the one mechanism):
    model(ids, atlaskv_kb=kb_in)              explicitly, as a forward kwarg: transformers passes unknown
                                              kwargs down to every attention call;
    with use_kb(kb_in): model.generate(...)   generate() rejects unknown kwargs, so a context variable holds
                                              it for the block (per thread: concurrent requests never meet).
A forward pre-hook on the model (attention.attach) opens each call: it takes the kwarg or the context
variable (`kb_of`), makes the context variable point at that KB until the call returns (so hooks that see no
kwargs, like the LM head's, read the same KB through `call_kb`), and starts the call's scratch state.
A batch of answers that started apart (serving: model/batching.py) passes KBRows instead, one KBInputs per
row: the hooks and the KB layers then work row by row, each row on its own KB and state.

A KBInputs has three parts: what the caller gives (embeddings or a pruned tree, the length correction, the
question embedding, the prompt mask), `call` (scratch state the layers share within a generate() call:
HiKVP selections, cached query terms, the copy matching) and `recorded` (what record=True collects: each KB
layer's prefill attention, and for pruned KBs the leaves it kept).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field

import torch

from atlaskv.model.pruning import PrunedKB

KB_KWARG = "atlaskv_kb"


@dataclass
class KBCallState:
    """Scratch state of one generate() call, shared by its KB layers and decode steps."""
    selections: dict = field(default_factory=dict)  # HiKVP: per layer (or "question") the kept leaves
    search_memo: object = None                      # HiKVP: pruning.SearchMemo, what the layers' searches share
    inv_std: torch.Tensor | None = None             # flat: the key LayerNorm scale per entry [Bk, N]
    question_q: dict = field(default_factory=dict)  # per layer: the question's KB-query term
    ids: torch.Tensor | None = None                 # this forward's input ids (the copy values read the text)
    copy_match: dict = field(default_factory=dict)  # copy values, per layer: (prefixes matched, values out)
    copy_boost: torch.Tensor | None = None          # copy logits: [B, V] for the call's last position
    copy_added: torch.Tensor | None = None          # copy logits the LM head added at the last step [B, V]


@dataclass
class KBAttention:
    """What record=True collects in the prefill: per KB layer the attention on the KB summed over heads
    ([B, T, N] flat; [B, T, G * n] pruned, beside the kept positions [B, G * n] in `selected`)."""
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    selected: dict[int, torch.Tensor] = field(default_factory=dict)
    readers: dict[int, tuple] = field(default_factory=dict)  # per layer (KB query, scaling, length shift, lse)

    def summed(self, pruned: bool, token_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample: (positions, weights) of the prefill KB attention summed over KB layers, heads and
        (real) prompt tokens, most attended first. Flat KBs give every position; pruned ones the union of
        the leaves each layer kept."""
        out = []
        layers = list(self.attention)
        for b in range(next(iter(self.attention.values())).shape[0] if layers else 0):
            pos, w = [], []
            for l in layers:
                a = self.attention[l][b]                                           # [T, K]
                if token_mask is not None:
                    a = a * token_mask[b, :a.shape[0], None].to(a.dtype)
                a = a.sum(0)
                p = self.selected[l][b] if pruned else torch.arange(len(a), device=a.device)
                keep = p >= 0
                pos.append(p[keep])
                w.append(a[keep])
            pos, w = torch.cat(pos), torch.cat(w)
            uniq, inv = torch.unique(pos, return_inverse=True)
            total = torch.zeros(len(uniq), dtype=w.dtype, device=w.device).index_add_(0, inv, w)
            order = torch.argsort(total, descending=True)
            out.append((uniq[order], total[order]))
        return out


@dataclass
class KBInputs:
    """The KB for one forward/generate call: base embeddings, shared by the batch or one KB per sample.

    keys, values: [N, d_in] (shared) or [B, N, d_in] (per sample; values may be wider: the value path's
    extra columns); mask: [B, N] True for real entries when per-sample KBs have different sizes (padded).
    pruned: a HiKVP tree instead (every KB layer searches it). scale_factor s adds min(0, ln s - ln N) to the
    KB logits (inference). key_inv_std: the key LayerNorm scale per entry when the caller has it cached.
    """
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    scale_factor: float | None = None
    record: bool = False
    mode: str = "auto"   # "pullback" | "project" | "auto" (the cheaper; both exact)
    question_emb: torch.Tensor | None = None  # [B, d_in] sentence embedding of each question
    keep_grad: bool = False  # training: recorded attention keeps its graph (auxiliary retrieval loss)
    pruned: PrunedKB | None = None
    token_mask: torch.Tensor | None = None  # [B, T] real prompt tokens (left padding excluded from routing)
    key_inv_std: torch.Tensor | None = None
    view: object | None = None              # the KBView read (AtlasKV.kb_inputs sets it): value texts, citations
    flat_rows: object | None = None         # flat: the view row of each KB position (np.ndarray)
    call: KBCallState = field(default_factory=KBCallState, repr=False)
    recorded: KBAttention = field(default_factory=KBAttention, repr=False)

    def __post_init__(self):
        if self.pruned is not None:
            if self.keys is not None:
                raise ValueError("a pruned KB reads its embeddings through the tree: pass pruned= without keys")
            return
        if self.keys is None or self.values is None:
            raise ValueError("KBInputs needs keys and values (flat) or pruned= (HiKVP)")
        if self.keys.dim() == 2:
            self.keys, self.values = self.keys[None], self.values[None]
        if self.keys.shape[:-1] != self.values.shape[:-1] or self.keys.dim() != 3 or self.values.dim() != 3:
            raise ValueError(f"KB keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} must both "
                             "be [N, d] or [B, N, d] with the same N (values may be wider: copy-value adapters)")
        if self.mask is not None and self.mask.shape != self.keys.shape[:2]:
            raise ValueError(f"KB mask {tuple(self.mask.shape)} must be [B, N] = {tuple(self.keys.shape[:2])}")
        if self.key_inv_std is not None:
            self.call.inv_std = self.key_inv_std if self.key_inv_std.dim() == 2 else self.key_inv_std[None]

    @property
    def size(self) -> int:
        return self.pruned.size if self.pruned is not None else self.keys.shape[1]

    @property
    def attention(self) -> dict[int, torch.Tensor]:
        return self.recorded.attention

    @property
    def selected(self) -> dict[int, torch.Tensor]:
        return self.recorded.selected

    def summed_attention(self, token_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.recorded.summed(self.pruned is not None, token_mask)

    def cited_rows(self, token_mask: torch.Tensor | None = None) -> list[tuple[object, torch.Tensor]]:
        """Per sample: (view rows as np.ndarray, weights) of the prefill KB attention, most attended first."""
        out = []
        for pos, w in self.summed_attention(token_mask):
            rows = pos.cpu().numpy()
            out.append((rows if self.flat_rows is None else self.flat_rows[rows], w))
        return out

    def inv_std(self, adapter) -> torch.Tensor:
        # the same for every layer (one LayerNorm over all slots): computed once per call
        if self.call.inv_std is None:
            self.call.inv_std = adapter.key_inv_std(self.keys.to(adapter.key_proj.weight.dtype))
        return self.call.inv_std


@dataclass
class KBRows:
    """One KB per row of a batched forward, each with its own call state: answers that started apart (each
    with its own KB snapshot and HiKVP selection) are prefilled and decoded together (model/batching.py).
    The KB layers run row by row on it in a prefill; in a decode step over kept HiKVP selections they run as
    one batch over the rows' stacked leaves (attention._decode_rows), which `stacked` keeps per layer while
    the rows stay the same; everything else in the model is batched."""
    rows: list[KBInputs]
    stacked: dict = field(default_factory=dict, repr=False)


def merged(rows: list[KBInputs], token_mask: torch.Tensor | None) -> KBInputs | None:
    """One KBInputs for a batched prefill whose rows read the same KB snapshot in the same way (serving admits a
    group over one snapshot): the KB layers then run once for the batch, each sample still searching the tree
    with its own question, instead of once per row (KBRows). None when the rows differ; `rows_from` hands each
    row its part afterwards."""
    first = rows[0]

    def same(r: KBInputs) -> bool:
        if r.view is not first.view or (r.pruned is None) != (first.pruned is None) or r.mode != first.mode \
                or (r.scale_factor, r.record, r.keep_grad) != (first.scale_factor, first.record, first.keep_grad) \
                or (r.question_emb is None) != (first.question_emb is None) or r.call.selections:
            return False
        if r.pruned is None:  # the same loaded tensors (each KBInputs holds its own view of them)
            return all(a.shape == b.shape and a.data_ptr() == b.data_ptr()
                       for a, b in ((r.keys, first.keys), (r.values, first.values))) and r.mask is None
        p, q = r.pruned, first.pruned
        return p.hierarchy is q.hierarchy and p.keys is q.keys and p.values is q.values and p.live is q.live \
            and p.config == q.config
    if len(rows) < 2 or not all(same(r) for r in rows):
        return None
    qemb = None if first.question_emb is None else torch.cat([r.question_emb for r in rows])
    if first.pruned is not None:
        return KBInputs(pruned=first.pruned, scale_factor=first.scale_factor, record=first.record, mode=first.mode,
                        question_emb=qemb, token_mask=token_mask, view=first.view, keep_grad=first.keep_grad)
    return KBInputs(first.keys, first.values, scale_factor=first.scale_factor, record=first.record, mode=first.mode,
                    question_emb=qemb, token_mask=token_mask, key_inv_std=first.call.inv_std, view=first.view,
                    flat_rows=first.flat_rows, keep_grad=first.keep_grad)


def rows_from(batch: KBInputs, rows: list[KBInputs]) -> None:
    """After a merged prefill: row b's call state and recording, as a prefill of that row alone leaves them
    (its kept leaves trimmed to its own width), so its decode steps, value decoding and citations read only
    its own part."""
    def cut(t: torch.Tensor | None, b: int, n: int | None = None, width: int | None = None, G: int = 1):
        """[B, ..., G * width] -> [1, ..., G * n] (the last axis holds G groups of `width` leaves)."""
        if t is None:
            return None
        t = t[b:b + 1]
        if n is None or n == width:
            return t
        return t.unflatten(-1, (G, width))[..., :n].flatten(-2)

    for b, one in enumerate(rows):
        sels = {key: sel.row(b) for key, sel in batch.call.selections.items()}
        one.call.selections = sels
        one.call.search_memo = None
        one.call.inv_std = batch.call.inv_std
        one.call.question_q = {l: q[b:b + 1] for l, q in batch.call.question_q.items()}
        one.call.ids = cut(batch.call.ids, b)
        one.call.copy_boost = cut(batch.call.copy_boost, b)
        one.call.copy_added = cut(batch.call.copy_added, b)
        for layer, (state, done) in batch.call.copy_match.items():
            sel = batch.call.selections.get("question", batch.call.selections.get(layer))
            n = sels[layer if layer in sels else "question"].width if sel is not None else None
            one.call.copy_match[layer] = (state[b:b + 1, :, :n], done[b:b + 1, :, :n])
        for layer, a in batch.recorded.attention.items():
            sel = batch.call.selections.get("question", batch.call.selections.get(layer))
            if sel is None:  # flat: every row attends to every entry
                one.recorded.attention[layer] = a[b:b + 1]
                continue
            G, width = sel.positions.shape[1:]
            n = sels[layer if layer in sels else "question"].width
            one.recorded.attention[layer] = cut(a, b, n, width, G)
            one.recorded.selected[layer] = cut(batch.recorded.selected[layer], b, n, width, G)
        for layer, (q, scaling, shift, lse) in batch.recorded.readers.items():
            if torch.is_tensor(shift) and shift.shape[0] > 1:
                shift = shift[b:b + 1]
            one.recorded.readers[layer] = (q[b:b + 1], scaling, shift, lse[b:b + 1])

_ACTIVE: contextvars.ContextVar[KBInputs | KBRows | None] = contextvars.ContextVar("atlaskv_kb", default=None)
_OPEN_CALLS = threading.local()  # per thread: the context tokens of forward calls in progress


@contextlib.contextmanager
def use_kb(kb: KBInputs | None):
    """Attach `kb` to every forward call inside the block, e.g. around `model.generate(...)`."""
    token = _ACTIVE.set(kb)
    try:
        yield kb
    finally:
        _ACTIVE.reset(token)


def kb_of(kwargs: dict) -> KBInputs | None:
    """The KB a forward call reads: its explicit kwarg, else the one use_kb (or the open call) set."""
    return kwargs.get(KB_KWARG) or _ACTIVE.get()


def call_kb() -> KBInputs | None:
    """The KB of the forward call in progress on this thread (for hooks that see no kwargs)."""
    return _ACTIVE.get()


def open_call(module, args, kwargs):
    """Model forward pre-hook: pin the call's KB for its hooks; a new prompt (no cache position past 0)
    starts the copy matching afresh; the call's input ids are kept for the value path."""
    kb = kb_of(kwargs)
    stack = _OPEN_CALLS.__dict__.setdefault("tokens", [])
    stack.append(_ACTIVE.set(kb))
    if kb is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    pos, past = kwargs.get("cache_position"), kwargs.get("past_key_values")
    if pos is not None:
        new_prompt = int(pos[0]) == 0
    else:
        new_prompt = past is None or past.get_seq_length() == 0
    for b, one in enumerate(kb.rows if isinstance(kb, KBRows) else [kb]):
        if new_prompt:
            one.call.copy_match.clear()
        one.call.ids = ids if not isinstance(kb, KBRows) else ids[b:b + 1]
        one.call.copy_boost = None
        one.call.copy_added = None
    return None


def close_call(module, args, kwargs, output):
    """Model forward hook (also after an exception): the KB pinned by open_call is released."""
    stack = _OPEN_CALLS.__dict__.get("tokens")
    if stack:
        _ACTIVE.reset(stack.pop())
    return None
