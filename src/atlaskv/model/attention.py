"""KB-augmented attention for stock Hugging Face models, through transformers' own extension points.

    attach(model, adapter)   registers an attention function "atlaskv_<base>" in AttentionInterface (and
                             its mask function), switches the model to it, and adds a forward pre-hook on
                             each KB layer's self-attention that computes the KB query from hidden states.
    model(..., atlaskv_kb=KBInputs(...))       the KB travels as a forward kwarg down to every attention call;
    with use_kb(kb): model.generate(...)       or in a context variable (generate() rejects unknown kwargs).
                             Without a KB every layer runs the base implementation unchanged.

Per KB layer, for text query t and head h (method.md §1.4-1.7):
    s_text = RoPE(q) . RoPE(k) * scaling + mask           (text keys from the KV cache; KB never enters it)
    s_kb   = q_kb . key_l(e_m) * scaling [+ ln s - ln N]   (no RoPE on either side)
    out    = softmax over [KB | text] of both, written as the two-softmax merge
           = exp(lse_text - lse) softmax(s_text) V + exp(lse_kb - lse) softmax(s_kb) V_kb
all in fp32 whatever the model dtype. Keys and values stay in base-embedding space: with key_l(e) =
(W_l e + b_l) * r(e) (LayerNorm, r = 1/std over the full vector),
    q . key_l(e) = ((q W_l) . e + q . b_l) * r(e)          and     sum_m p_m value_l(e_m) = W_l^v (p E) + b^v sum_m p_m
so a layer scores N entries with d_in-dim dot products and never builds [N, heads, head_dim] tensors.
Pruned KBs project only the kept leaves, once per selection; decode steps then reuse them (_decode_step).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from atlaskv.model.adapter import KBAdapter, _attention_modules
from atlaskv.model.pruning import LayerScorer, PrunedKB, gather, search

PREFIX = "atlaskv_"


@dataclass
class KBInputs:
    """The KB for one forward/generate call: base embeddings, shared by the batch or one KB per sample.

    keys, values: [N, d_in] (shared) or [B, N, d_in] (per sample); mask: [B, N] True for real entries when
    per-sample KBs have different sizes (padded). scale_factor s adds ln s - ln N to KB logits (inference).
    With record=True each KB layer stores its prefill attention on the KB, summed over heads: [B, T, N].
    """
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    scale_factor: float | None = None
    record: bool = False
    scale_mode: str = "shift"   # "shift": + ln s - ln N always (the reference); "cap": only when N > s
    mode: str = "auto"   # "pullback" | "project" | "auto" (the cheaper; both exact)
    question_emb: torch.Tensor | None = None  # [B, d_in] sentence embedding of each question (adapters with question_input)
    keep_grad: bool = False  # training: recorded attention keeps its graph (auxiliary retrieval loss)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    pruned: PrunedKB | None = None   # HiKVP: search the tree at every KB layer instead of scoring every entry
    token_mask: torch.Tensor | None = None  # [B, T] real prompt tokens (left padding excluded from routing)
    selected: dict[int, torch.Tensor] = field(default_factory=dict)  # pruned: prefill leaf positions [B, K]
    _selections: dict = field(default_factory=dict, repr=False)
    _inv_std: torch.Tensor | None = field(default=None, repr=False)
    _question_q: dict = field(default_factory=dict, repr=False)  # per layer: the question's KB-query term
    _call_ids: torch.Tensor | None = field(default=None, repr=False)  # copy values: this forward call's input ids
    _copy_match: dict = field(default_factory=dict, repr=False)  # copy values, per layer: (prefixes matched, values out)
    _copy_boost: torch.Tensor | None = field(default=None, repr=False)  # copy logits: [B, V] for the call's last position

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
                             "be [N, d] or [B, N, d] with the same N (values may be wider: token-value adapters)")
        if self.mask is not None and self.mask.shape != self.keys.shape[:2]:
            raise ValueError(f"KB mask {tuple(self.mask.shape)} must be [B, N] = {tuple(self.keys.shape[:2])}")

    @property
    def size(self) -> int:
        return self.pruned.size if self.pruned is not None else self.keys.shape[1]

    def summed_attention(self, token_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
                p = self.selected[l][b] if self.pruned is not None else torch.arange(len(a), device=a.device)
                keep = p >= 0
                pos.append(p[keep])
                w.append(a[keep])
            pos, w = torch.cat(pos), torch.cat(w)
            uniq, inv = torch.unique(pos, return_inverse=True)
            total = torch.zeros(len(uniq), dtype=w.dtype, device=w.device).index_add_(0, inv, w)
            order = torch.argsort(total, descending=True)
            out.append((uniq[order], total[order]))
        return out

    def inv_std(self, adapter: KBAdapter) -> torch.Tensor:
        # the same for every layer (one LayerNorm over all slots): computed once per call
        if self._inv_std is None:
            self._inv_std = adapter.key_inv_std(self.keys.to(adapter.key_proj.weight.dtype))
        return self._inv_std


def _to_additive(mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """The text mask as additive fp32 [.., T, S]; None (sdpa's "plain causal") becomes a causal mask."""
    if mask is None:
        allowed = torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)
        return torch.zeros(T, S, device=device).masked_fill(~allowed, float("-inf"))
    mask = mask[..., :S]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _per_query_head(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """KB weights at kv-head width ("kv" layout) repeated for each query head of the group."""
    return t if t.shape[0] == n_heads else t.repeat_interleave(n_heads // t.shape[0], dim=0)


def _scores(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """u [B, H, T, d] . e [Bk, G, n, d] -> [B, H, T, n]. A broadcasting matmul would first copy e for
    every head (1.4 GB per layer at 10^5 entries), so shared sets fold heads and tokens into rows."""
    B, H, T, d = u.shape
    if e.shape[1] == 1:
        if e.shape[0] == 1:
            return (u.reshape(B * H * T, d) @ e[0, 0].T).view(B, H, T, -1)
        return (u.reshape(B, H * T, d) @ e[:, 0].transpose(-1, -2)).view(B, H, T, -1)
    return u @ e.transpose(-1, -2)


def _weighted(p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """p [B, H, T, n] . e [Bk, G, n, d] -> [B, H, T, d] (the same folding as _scores)."""
    B, H, T, n = p.shape
    if e.shape[1] == 1:
        if e.shape[0] == 1:
            return (p.reshape(B * H * T, n) @ e[0, 0]).view(B, H, T, -1)
        return (p.reshape(B, H * T, n) @ e[:, 0]).view(B, H, T, -1)
    return p @ e


def kb_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 *, base: str, **kwargs):
    kwargs.pop(PREFIX + "kb", None)
    layer_ctx = kwargs.pop(PREFIX + "layer", None)
    if layer_ctx is None:  # no KB here: the stock implementation, bit for bit
        return _base_attention(type(module), base)(module, query, key, value, attention_mask, scaling=scaling,
                                                   dropout=dropout, **kwargs)

    adapter, layer, q_kb, kb = layer_ctx
    B, H, T, D = query.shape
    scaling = D ** -0.5 if scaling is None else scaling
    f = torch.promote_types(query.dtype, torch.float32)  # fp32 at least, whatever the model's dtype
    groups = H // key.shape[1]
    if T == 1 and kb.pruned is not None and ("question" in kb._selections or layer in kb._selections) \
            and kb.pruned.config.reuse and not torch.is_grad_enabled() and not _softcap(module) \
            and not (kb.record and layer not in kb.attention):  # a one-token prefill still records
        return _decode_step(query, key, value, attention_mask, scaling, adapter, layer, q_kb, kb, f)
    k = key.to(f).repeat_interleave(groups, dim=1)
    v = value.to(f).repeat_interleave(groups, dim=1)
    S = k.shape[2]
    s_text = (query.to(f) @ k.transpose(-1, -2)) * scaling
    cap = _softcap(module)
    if cap:
        s_text = torch.tanh(s_text / cap) * cap
    s_text = s_text + _to_additive(attention_mask, T, S, query.device).to(f)

    # KB logits. Two exact ways, the cheaper one per call (both never touch other layers' slices):
    #   pull-back: q W_l . e  costs T*H*d_in per entry, best for decode steps (T = 1) and pruned KBs;
    #   project:   keys/values of this layer only, Hk*D*d_in per entry, best for long flat prefills.
    w_k, b_k = adapter.layer_weights(layer, "key")
    w_v, b_v = adapter.layer_weights(layer, "value")
    hk, d_in = w_k.shape[0], w_k.shape[-1]
    q = q_kb.to(f)
    if kb.pruned is not None:  # HiKVP: the kept leaves of this layer, [B, G, n, d_in] (G = 1 or H)
        sel = _select(kb, adapter, layer, q, w_k, b_k, scaling, f)
        valid = sel.valid
        n_kb = valid.sum(-1).clamp_min(1).float() if kb.pruned.config.scale_n == "selected" \
            else torch.full(valid.shape[:2], float(kb.size), device=valid.device)
        mode = "selected"
    else:
        e_k, e_v = kb.keys.to(f)[:, None], kb.values.to(f)[:, None]                  # [Bk, 1, N, d_in]
        inv_std = kb.inv_std(adapter).to(f)[:, None]                                   # [Bk, 1, N]
        valid = None if kb.mask is None else kb.mask[:, None]
        n_kb = (kb.mask.sum(-1).clamp_min(1).float() if kb.mask is not None
                else torch.full((1,), float(kb.size), device=q.device))[:, None]
        mode = kb.mode
        if mode == "auto":
            mode = "project" if hk * D * d_in + T * H * D < T * H * d_in else "pullback"
    if mode == "selected":  # the few kept leaves, projected once per selection and reused by decode steps
        k_kb, v_kb = _projected(sel, adapter, layer, H, f)                             # [B, H, n, D]
        s_kb = (q @ k_kb.transpose(-1, -2)) * scaling
    elif mode == "pullback":
        w_kh, b_kh = _per_query_head(w_k, H).to(f), _per_query_head(b_k, H).to(f)
        u = torch.einsum("bhtd,hdi->bhti", q, w_kh)
        c = torch.einsum("bhtd,hd->bht", q, b_kh)
        s_kb = (_scores(u, e_k) + c[..., None]) * inv_std[:, :, None, :] * scaling   # [B, H, T, n]
    else:
        k_kb = (torch.einsum("hdi,bni->bhnd", w_k.to(f), e_k[:, 0]) + b_k.to(f)[None, :, None, :]) \
            * inv_std[:, :, :, None]
        k_kb = _per_query_head(k_kb.transpose(0, 1), H).transpose(0, 1)           # [Bk, H, N, D]
        s_kb = (q @ k_kb.expand(B, -1, -1, -1).transpose(-1, -2)) * scaling
    if kb.scale_factor is not None:
        s_kb = s_kb + _length_shift(kb, n_kb.to(s_kb.device))[:, :, None, None]
    if valid is not None:
        s_kb = s_kb.masked_fill(~valid[:, :, None, :], float("-inf"))

    # one joint softmax, written as the merge of two partial softmaxes (needed when the KB part is pruned)
    lse_text = torch.logsumexp(s_text, -1, keepdim=True)
    lse_kb = torch.logsumexp(s_kb, -1, keepdim=True)
    lse = torch.logaddexp(lse_text, lse_kb)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with nothing to attend to
    p_text = torch.exp(s_text - lse)
    p_kb = torch.exp(s_kb - lse)
    out = p_text @ v
    if mode == "selected":
        out = out + p_kb @ v_kb
    elif mode == "pullback":  # sum_m p_m (W e_m + b) = W (p E) + b sum_m p_m
        w_vh, b_vh = _per_query_head(w_v, H).to(f), _per_query_head(b_v, H).to(f)
        pe = _weighted(p_kb, e_v)                                                      # [B, H, T, d_in]
        out = out + torch.einsum("bhti,hdi->bhtd", pe, w_vh) + p_kb.sum(-1, keepdim=True) * b_vh[None, :, None, :]
    else:
        v_kb = torch.einsum("hdi,bni->bhnd", w_v.to(f), e_v[:, 0]) + b_v.to(f)[None, :, None, :]
        v_kb = _per_query_head(v_kb.transpose(0, 1), H).transpose(0, 1)
        out = out + p_kb @ v_kb.expand(B, -1, -1, -1)
    if adapter.config.copy_values:
        out = out + _copy_write(adapter, layer, p_kb, sel.values if mode == "selected" else kb.values[:, None], kb, f)
    if kb.record and layer not in kb.attention:  # the first call is the prefill; decode steps do not overwrite it
        p_rec = p_kb if kb.keep_grad else p_kb.detach()
        if kb.pruned is None:
            kb.attention[layer] = p_rec.sum(1)                                          # [B, T, N]
        else:  # per group of heads sharing a leaf set: [B, T, G * n] beside positions [B, G * n]
            G = sel.keys.shape[1]
            kb.attention[layer] = p_rec.view(B, G, H // G, T, -1).sum(2).permute(0, 2, 1, 3).reshape(B, T, -1)
            kb.selected[layer] = sel.positions.reshape(B, -1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@functools.cache
def _base_attention(module_type: type, base: str):
    """The stock attention function a layer without KB runs (looked up once per class: every layer of every
    decode step passes here). Eager is each family's own function (Gemma's applies its logit
    soft-capping), llama's otherwise."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    return getattr(sys.modules.get(module_type.__module__), "eager_attention_forward", None) or eager_attention_forward


def _softcap(module: nn.Module) -> float | None:
    return getattr(module, "attn_logit_softcapping", None) or getattr(module.config, "attn_logit_softcapping", None)


def _length_shift(kb: KBInputs, n_kb: torch.Tensor) -> torch.Tensor:
    """ln s - ln N added to the KB logits (N: entries the layer attends to, per sample and head group)."""
    shift = math.log(kb.scale_factor) - torch.log(n_kb)
    return shift.clamp_max(0) if kb.scale_mode == "cap" else shift  # "cap": only damp KBs larger than s


def _decode_step(query, key, value, attention_mask, scaling, adapter, layer, q_kb, kb, f):
    """One generated token over a pruned KB whose selection the prefill already made: the same joint
    softmax over [KB | text] as kb_attention, as one softmax over the concatenated logits. Decoding on a
    CPU is bound by memory traffic, so nothing is copied to query-head width: the text scores use the
    grouped query layout against the cache's own keys, and the kept leaves' keys/values, length shift and
    padding mask are built once per selection (the two-softmax merge cost about twice as much per step)."""
    sel = kb._selections["question" if "question" in kb._selections else layer]
    B, H, _, D = query.shape
    if ("decode", layer) not in sel.cache:
        valid = sel.valid                                                               # [B, G, n]
        n_kb = valid.sum(-1).clamp_min(1).float() if kb.pruned.config.scale_n == "selected" \
            else torch.full(valid.shape[:2], float(kb.size), device=valid.device)
        bias = torch.zeros(valid.shape, dtype=f, device=valid.device)
        if kb.scale_factor is not None:
            bias = bias + _length_shift(kb, n_kb)[..., None].to(f)
        bias = bias.masked_fill(~valid, float("-inf"))
        sel.cache[("decode", layer)] = _per_query_head(bias.transpose(0, 1), H).transpose(0, 1)[:, :, None, :]
    k_kb, v_kb = _projected(sel, adapter, layer, H, f)                                  # [B, H, n, D]
    bias = sel.cache[("decode", layer)]                                                   # [B, H, 1, n]
    Hk = key.shape[1]
    g = H // Hk
    s_kb = (q_kb.to(f) @ k_kb.transpose(-1, -2)) * scaling + bias                       # [B, H, 1, n]
    q = query.to(f).reshape(B, Hk, g, D)                                                # heads of a group as rows
    s_text = ((q @ key.to(f).transpose(-1, -2)) * scaling).view(B, H, 1, -1)            # [B, H, 1, S]
    if attention_mask is not None:
        s_text = s_text + _to_additive(attention_mask, 1, s_text.shape[-1], query.device).to(f)
    p = torch.softmax(torch.cat([s_kb, s_text], -1), -1)
    n = s_kb.shape[-1]
    out = p[..., :n] @ v_kb + (p[..., n:].reshape(B, Hk, g, -1) @ value.to(f)).view(B, H, 1, D)
    if adapter.config.copy_values:
        out = out + _copy_write(adapter, layer, p[..., :n], sel.values, kb, f)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _copy_write(adapter: KBAdapter, layer: int, p_kb: torch.Tensor, values: torch.Tensor, kb: KBInputs, f):
    """Copy values: the token part of every value writes the value's *next* token, not always its first.

    The static value already writes g R A E[first token] (layer_weights). Per entry, j = the longest prefix
    of its token ids that the text ends with (the first token also matches without its leading space); where
    j > 0 this adds g R A (E[token j] - E[first token]), or cancels the write (- E[first token]) once the
    whole value is out, and from then on for the rest of the text. So after "Marvel" the entry pushes
    " Comics", and after "Marvel Comics" nothing, also after the next comma: the constant first-token write
    made the model repeat it ("Marvel Marvel Marvel", and with the prefix match alone "Memphis, Memphis,").
    The matching state carries over decode steps (T = 1) and restarts where a chat turn opens or closes (the
    model's bos / eos / pad ids), so a value the question names is not taken as said. p_kb: [B, H, T, n]; values: [Bk, G, n, d] with the id columns last."""
    c = adapter.config
    i = c.kb_layers.index(layer)
    write = bool(adapter.token_gain[i].detach() != 0)
    point = c.copy_logit_gain > 0 and layer == c.kb_layers[-1] and not torch.is_grad_enabled()  # inference only
    if kb._call_ids is None or not (write or point):
        return 0.0
    m = c.copy_tokens
    ids = values[..., -(m + 1):].round().long()                                        # [Bk, G, n, m + 1]
    bare, vid = ids[..., 0], ids[..., 1:]
    length = (vid >= 0).sum(-1)                                                         # [Bk, G, n]
    x = kb._call_ids.to(vid.device)                                                     # [B, T]
    B, H, T, n = p_kb.shape
    G = vid.shape[1]
    prev = kb._copy_match.get(layer) if T == 1 else None
    if prev is None or prev[0].shape[-2] != n:
        prev = (torch.zeros((B, G, n, m), dtype=torch.bool, device=vid.device),
                torch.zeros((B, G, n), dtype=torch.bool, device=vid.device))
    state, done = prev
    steps = torch.arange(1, m + 1, device=vid.device)
    js, dones = [], []
    new_turn = torch.isin(x, adapter.turn_ids.to(x.device))                             # [B, T]
    turn_at = new_turn.any(0).tolist()  # one host sync per call, not one per token
    for t in range(T):
        tok = x[:, t, None, None]                                                       # [B, 1, 1]
        if turn_at[t]:  # a chat turn opens or closes: nothing of any value is out yet
            fresh = ~new_turn[:, t, None, None]
            state, done = state & fresh[..., None], done & fresh
        first = (vid[..., 0] == tok) | (bare == tok)
        state = torch.cat([first[..., None], state[..., :-1] & (vid[..., 1:] == tok[..., None])], -1)
        jt = (state * steps).amax(-1)                                                   # [B, G, n]
        js.append(jt)
        dones.append(done)
        done = done | ((jt > 0) & (jt >= length))
    kb._copy_match[layer] = (state, done)
    if point:
        _copy_pointer(adapter, p_kb, vid, jt, length, done, kb)
    if not write:
        return 0.0
    j = torch.stack(js, 2)                                                              # [B, G, T, n]
    was_done = torch.stack(dones, 2)                # the whole value already appeared before this position
    b, g, t, e = ((j > 0) | was_done).nonzero(as_tuple=True)
    if len(b) == 0:
        return 0.0
    table = adapter.token_table.detach().to(f)
    bk = b if vid.shape[0] > 1 else torch.zeros_like(b)
    jj = j[b, g, t, e]
    finished = (jj >= length[bk, g, e]) | was_done[b, g, t, e]
    nxt = vid[bk, g, e, jj.clamp(max=m - 1)]
    delta = torch.where(finished[:, None], 0.0, table[nxt.clamp_min(0)]) - table[vid[bk, g, e, 0]]   # [K, hidden]
    corr = torch.zeros((B, T, H, table.shape[1]), dtype=f, device=p_kb.device)
    if G == 1:  # every head read this entry
        corr.index_put_((b, t), p_kb[b, :, t, e][..., None] * delta[:, None, :], accumulate=True)
    else:       # head g read its own leaves
        corr.index_put_((b, t, g), p_kb[b, g, t, e][:, None] * delta, accumulate=True)
    w_v, _ = adapter.layer_weights(layer, "value")
    w_tok = _per_query_head(w_v[..., c.encoder_dim:c.encoder_dim + c.hidden_size], H).to(f)  # [H, D, hidden]
    return torch.einsum("bthc,hdc->bhtd", corr, w_tok)


def _copy_pointer(adapter: KBAdapter, p_kb: torch.Tensor, vid: torch.Tensor, j: torch.Tensor, length: torch.Tensor,
                  done: torch.Tensor, kb: KBInputs) -> None:
    """Copy logits: after the last KB layer, each entry votes for its next value token (its first until the
    text ends with a prefix of it, nothing once all of it is out) with its share of that layer's KB attention
    at the call's last position; _copy_logits_hook adds gain x the votes to the next-token logits. Unlike the
    residual write this skips the last layers and the final norm, so the gain reads in nats. j: the prefix
    each entry has matched after the call's last token, [B, G, n]; length: its token count, [Bk, G, n]."""
    B, H, T, n = p_kb.shape
    w = p_kb[:, :, -1, :]                                                               # [B, H, n]
    G = vid.shape[1]
    w = w.sum(1, keepdim=True) if G == 1 else w                                        # [B, G, n]
    if adapter.config.copy_logit_norm == "kb":  # the entry's share of the KB part
        w = w / w.sum((1, 2), keepdim=True).clamp_min(1e-30)
    else:  # "mass": the entry's share of all attention (KB and text), averaged over heads
        w = w / H
    bk = vid if vid.shape[0] == B else vid.expand(B, -1, -1, -1)
    nxt = torch.gather(bk, -1, j.clamp(max=bk.shape[-1] - 1)[..., None])[..., 0]        # [B, G, n]
    nxt = torch.where(j >= length, -1, nxt)
    keep = (~done) & (nxt >= 0)
    # once one entry's whole value is out the answer has its fact: no more votes (they appended other
    # values: "Chicago United States Dollar")
    keep = keep & ~done.flatten(1).any(1)[:, None, None]
    V = adapter.token_table.shape[0]
    boost = torch.zeros((B, V), dtype=torch.float32, device=p_kb.device)
    bb = torch.arange(B, device=p_kb.device)[:, None, None].expand_as(nxt)
    boost.index_put_((bb[keep], nxt[keep]), w[keep].float(), accumulate=True)
    kb._copy_boost = boost


def _projected(sel, adapter: KBAdapter, layer: int, H: int, f: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's keys (LayerNorm-scaled) and values of the selected leaves at query-head width,
    [B, H, n, D]; computed on first use and kept with the selection (decode steps reuse it)."""
    if ("proj", layer) not in sel.cache:
        (w_k, b_k), (w_v, b_v) = adapter.layer_weights(layer, "key"), adapter.layer_weights(layer, "value")
        w_k, b_k, w_v, b_v = (_per_query_head(t, H).to(f) for t in (w_k, b_k, w_v, b_v))
        e_k, e_v = sel.keys.to(f), sel.values.to(f)                                    # [B, G, n, d_in]
        inv_std = adapter.key_inv_std(e_k.to(adapter.key_proj.weight.dtype)).to(f)    # [B, G, n]
        if e_k.shape[1] == 1:  # one leaf set for all heads
            k = torch.einsum("hdi,bni->bhnd", w_k, e_k[:, 0]) * inv_std[:, 0, None, :, None]
            v = torch.einsum("hdi,bni->bhnd", w_v, e_v[:, 0])
            inv_b = inv_std[:, 0, None, :, None]
        else:  # per head: head h reads its own leaves
            k = torch.einsum("hdi,bhni->bhnd", w_k, e_k) * inv_std[..., None]
            v = torch.einsum("hdi,bhni->bhnd", w_v, e_v)
            inv_b = inv_std[..., None]
        sel.cache[("proj", layer)] = (k + b_k[None, :, None, :] * inv_b, v + b_v[None, :, None, :])
    return sel.cache[("proj", layer)]


def _select(kb: KBInputs, adapter: KBAdapter, layer: int, q: torch.Tensor, w_k: torch.Tensor,
            b_k: torch.Tensor, scaling: float, f: torch.dtype):
    """This layer's kept leaves for every sample (cached: decode steps reuse the prefill's when configured;
    question routing is the same for all layers, so it runs once per call)."""
    cfg = kb.pruned.config
    key = "question" if cfg.route == "question" else layer
    if key in kb._selections and (cfg.reuse or cfg.route == "question"):
        return kb._selections[key]
    if cfg.route != "kbq" and kb.question_emb is None:
        raise ValueError(f"HiKVP route {cfg.route!r} needs the question's sentence embedding (question_emb)")
    H = q.shape[1]
    w_kh, b_kh = _per_query_head(w_k, H).to(f), _per_query_head(b_k, H).to(f)
    B, _, T, _ = q.shape
    tm = kb.token_mask
    tm = tm.to(q.dtype) if tm is not None and tm.shape[1] == T else None
    picks = []
    for b in range(B):
        scorer = None if cfg.route == "question" else \
            LayerScorer(q[b], w_kh, b_kh, scaling, None if tm is None else tm[b])
        qe = None if kb.question_emb is None else kb.question_emb[b].to(q.dtype)
        picks.append(search(kb.pruned, adapter, scorer, qe, cfg.route))
    sel = gather(kb.pruned, picks, max(len(p) for p in picks))
    kb._selections[key] = sel
    return sel


_CURRENT_KB: contextvars.ContextVar[KBInputs | None] = contextvars.ContextVar("atlaskv_kb", default=None)


@contextlib.contextmanager
def use_kb(kb: KBInputs | None):
    """Attach `kb` to every forward call inside the block, e.g. around `model.generate(...)`
    (generate() rejects unknown kwargs). A context variable, so concurrent threads never see each other's KB."""
    token = _CURRENT_KB.set(kb)
    try:
        yield kb
    finally:
        _CURRENT_KB.reset(token)


def _kb_query_hook(module, args, kwargs, *, adapter: KBAdapter, layer: int):
    kb = kwargs.get(PREFIX + "kb") or _CURRENT_KB.get()
    if kb is None:
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    head = adapter.kb_query[str(layer)]
    q = head(hidden.to(head.weight.dtype))  # the adapter may stay fp32 under a bf16 model
    q = q.view(*hidden.shape[:-1], -1, adapter.config.head_dim).transpose(1, 2)
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None:  # Qwen3 / Gemma 3 normalise each query head before RoPE; the KB head was copied from q_proj
        q = q_norm(q)
    if adapter.config.question_input:
        if kb.question_emb is None:
            raise ValueError("this adapter reads the question's sentence embedding: pass KBInputs(question_emb=...)")
        if layer not in kb._question_q or torch.is_grad_enabled():  # the same for every decode step
            kb._question_q[layer] = adapter.question_query(kb.question_emb, layer)[:, :, None, :].to(q.dtype)
        q = q + kb._question_q[layer]
    return args, {**kwargs, PREFIX + "layer": (adapter, layer, q, kb)}


def _record_ids_hook(module, args, kwargs):
    """Copy values read the text so far: keep each forward call's input ids on its KB (a new prompt, i.e.
    no cache position past 0, starts the matching afresh)."""
    kb = kwargs.get(PREFIX + "kb") or _CURRENT_KB.get()
    ids = kwargs.get("input_ids", args[0] if args else None)
    if kb is None or ids is None:
        return None
    pos, past = kwargs.get("cache_position"), kwargs.get("past_key_values")
    if pos is not None:
        new_prompt = int(pos[0]) == 0
    else:
        new_prompt = past is None or past.get_seq_length() == 0
    if new_prompt:
        kb._copy_match.clear()
    kb._call_ids = ids
    kb._copy_boost = None
    _CALL_KB.set(kb)
    return None


_CALL_KB: contextvars.ContextVar[KBInputs | None] = contextvars.ContextVar("atlaskv_call_kb", default=None)


def _copy_logits_hook(module, args, output, *, adapter: KBAdapter):
    """Copy logits: the last KB layer's votes (_copy_pointer) raise the last position's next-token logits."""
    kb = _CALL_KB.get()
    if kb is None or kb._copy_boost is None:
        return None
    boost, kb._copy_boost = kb._copy_boost, None
    if output.shape[0] != boost.shape[0] or output.shape[-1] < boost.shape[1]:
        return None
    c = adapter.config
    output = output.clone()
    if c.copy_logit_mode == "add":
        output[:, -1, :boost.shape[1]] += (c.copy_logit_gain * boost).to(output.dtype)
    else:  # "mix": the next token comes from the model with 1 - g, from the votes with g (a pointer-generator)
        z = output[:, -1].float().log_softmax(-1) + math.log1p(-c.copy_logit_gain)
        votes = torch.zeros_like(z)
        votes[:, :boost.shape[1]] = boost
        output[:, -1] = torch.logaddexp(z, (c.copy_logit_gain * votes).log()).to(output.dtype)
    return output


def register(base: str) -> str:
    """Register "atlaskv_<base>" (attention + mask function) once; returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("eager", "sdpa"):
        raise ValueError(f"KB attention runs over eager or sdpa base attention, not {base!r}")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(kb_attention, base=base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask if base == "eager" else sdpa_mask)
    return name


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def attach(model, adapter: KBAdapter) -> None:
    """Make `model` read a KB passed as `atlaskv_kb=`; the model's own weights and modules are untouched."""
    detach(model)
    base = model.config._attn_implementation or "eager"
    base = base[len(PREFIX):] if base.startswith(PREFIX) else base
    if base not in ("eager", "sdpa"):
        base = "sdpa"
    adapter.config.check_fits(model)
    adapter.bind(model)
    attn = _attention_modules(model)
    handles = [attn[l].register_forward_pre_hook(functools.partial(_kb_query_hook, adapter=adapter, layer=l),
                                                 with_kwargs=True) for l in adapter.config.kb_layers]
    if adapter.config.copy_values:
        handles.append(model.register_forward_pre_hook(_record_ids_hook, with_kwargs=True))
        handles.append(model.get_output_embeddings().register_forward_hook(
            functools.partial(_copy_logits_hook, adapter=adapter)))
    model._atlaskv = {"handles": handles, "base": base, "adapter": adapter}
    _set_attn(model, register(base))


def detach(model) -> None:
    state = getattr(model, "_atlaskv", None)
    if state is None:
        return
    for h in state["handles"]:
        h.remove()
    _set_attn(model, state["base"])
    del model._atlaskv
