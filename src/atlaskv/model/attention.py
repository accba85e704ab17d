"""The KB attention kernel for stock Hugging Face models, through transformers' own extension points.

    attach(model, adapter)   registers an attention function "atlaskv_<base>" in AttentionInterface (and
                             its mask function), switches the model to it, and adds forward pre-hooks: one on
                             the model that opens each call (kb_inputs.open_call: how the KB travels is
                             described there), one on each KB layer's self-attention that computes the KB
                             query from hidden states. Without a KB every layer runs the base implementation.

Per KB layer, for text query t and head h (method.md §1.4-1.7):
    s_text = RoPE(q) . RoPE(k) * scaling + mask           (text keys from the KV cache; KB never enters it)
    s_kb   = q_kb . key_l(e_m) * scaling [+ min(0, ln s - ln N)]   (no RoPE on either side)
    out    = softmax over [KB | text] of both, written as the two-softmax merge
           = exp(lse_text - lse) softmax(s_text) V + exp(lse_kb - lse) softmax(s_kb) V_kb
             + what the value path writes (values.py)
all in fp32 whatever the model dtype. Keys and values stay in base-embedding space: with key_l(e) =
(W_l e + b_l) * r(e) (LayerNorm, r = 1/std over the full vector),
    q . key_l(e) = ((q W_l) . e + q . b_l) * r(e)          and     sum_m p_m value_l(e_m) = W_l^v (p E) + b^v sum_m p_m
so a layer scores N entries with d_in-dim dot products and never builds [N, heads, head_dim] tensors.
Pruned KBs project only the kept leaves, once per selection; decode steps then reuse them (_decode_step).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from atlaskv.model.adapter import KBAdapter, attention_modules
from atlaskv.model.kb_inputs import KBInputs, KBRows, close_call, kb_of, open_call
from atlaskv.model.pruning import LayerScorer, SearchMemo, gather, search

ATTN_PREFIX = "atlaskv_"
LAYER_KWARG = "atlaskv_layer"   # the KB query hook hands (adapter, layer, q_kb, kb) to the kernel


def _to_additive(mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """The text mask as additive fp32 [.., T, S]; None (sdpa's "plain causal") becomes a causal mask."""
    if mask is None:
        allowed = torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)
        return torch.zeros(T, S, device=device).masked_fill(~allowed, float("-inf"))
    mask = mask[..., :S]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return mask.float()


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
    kwargs.pop("atlaskv_kb", None)
    layer_ctx = kwargs.pop(LAYER_KWARG, None)
    if layer_ctx is None:  # no KB here: the stock implementation, bit for bit
        return _base_attention(type(module), base)(module, query, key, value, attention_mask, scaling=scaling,
                                                   dropout=dropout, **kwargs)

    adapter, layer, q_kb, kb = layer_ctx
    if isinstance(kb, KBRows) and query.shape[2] == 1 and all(_reuses(one, layer, module) for one in kb.rows):
        return _decode_rows(query, key, value, attention_mask, scaling or query.shape[-1] ** -0.5, adapter, layer,
                            q_kb, kb, torch.promote_types(query.dtype, torch.float32))
    if isinstance(kb, KBRows):  # requests batched apart: each row reads its own KB with its own state
        def row(m, b):
            return m[b:b + 1] if m is not None and m.shape[0] > 1 else m
        outs = [kb_attention(module, query[b:b + 1], key[b:b + 1], value[b:b + 1], row(attention_mask, b),
                             scaling, dropout, base=base, **kwargs, **{LAYER_KWARG: (adapter, layer, q_kb[b:b + 1], one)})[0]
                for b, one in enumerate(kb.rows)]
        return torch.cat(outs), None
    B, H, T, D = query.shape
    scaling = D ** -0.5 if scaling is None else scaling
    f = torch.promote_types(query.dtype, torch.float32)  # fp32 at least, whatever the model's dtype
    if T == 1 and _reuses(kb, layer, module):
        return _decode_step(query, key, value, attention_mask, scaling, adapter, layer, q_kb, kb, f)
    groups = H // key.shape[1]
    k = key.to(f).repeat_interleave(groups, dim=1)
    v = value.to(f).repeat_interleave(groups, dim=1)
    s_text = (query.to(f) @ k.transpose(-1, -2)) * scaling
    cap = _softcap(module)
    if cap:
        s_text = torch.tanh(s_text / cap) * cap
    s_text = s_text + _to_additive(attention_mask, T, k.shape[2], query.device).to(f)

    read = _kb_read(kb, adapter, layer, q_kb.to(f), scaling, f, T, D)
    # one joint softmax, written as the merge of two partial softmaxes (needed when the KB part is pruned)
    lse_text = torch.logsumexp(s_text, -1, keepdim=True)
    lse_kb = torch.logsumexp(read.scores, -1, keepdim=True)
    lse = torch.logaddexp(lse_text, lse_kb)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with nothing to attend to
    p_text = torch.exp(s_text - lse)
    p_kb = torch.exp(read.scores - lse)
    out = read.add_values(p_text @ v, p_kb)
    if kb.record and layer not in kb.attention:  # what scoring an absent key needs (probes.py)
        kb.recorded.readers[layer] = (q_kb.detach().to(f), scaling, read.shift, lse.detach())
    return _finish(out, p_kb, read, adapter, layer, kb, query.dtype, f)


@dataclass
class KBRead:
    """One KB layer's view of its entries: the KB logits [B, H, T, n] (length shift and padding applied),
    how to add the entries' values under weights p [B, H, T, n] to an output (add_values(out, p)), and the
    value rows [Bk, G, n, d] the value path reads (with their extra columns)."""
    scores: torch.Tensor
    add_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    value_rows: torch.Tensor
    selection: object = None   # pruned: the kept leaves (recorded with the attention)
    shift: torch.Tensor | float = 0.0  # the length shift added to every KB logit, [B, G, 1, 1] or 0


def _kb_read(kb: KBInputs, adapter: KBAdapter, layer: int, q: torch.Tensor, scaling: float, f, T: int, D: int) -> KBRead:
    """The KB logits of this layer, in the cheapest exact way (none touches other layers' slices):
    selected  HiKVP's kept leaves, projected once per selection and reused by decode steps;
    pull-back q W_l . e, T*H*d_in per entry: decode steps (T = 1) and short prompts;
    project   this layer's keys/values only, H*D*d_in per entry: long flat prefills."""
    w_k, b_k = adapter.layer_weights(layer, "key")
    w_v, b_v = adapter.layer_weights(layer, "value")
    B, H = q.shape[:2]
    if kb.pruned is not None:  # the kept leaves of this layer, [B, G, n, d_in] (G = 1 or H)
        sel = _select(kb, adapter, layer, q, w_k, b_k, scaling, f)
        n_kb = sel.valid.sum(-1).clamp_min(1).float() if kb.pruned.config.scale_n == "selected" \
            else torch.full(sel.valid.shape[:2], float(kb.size), device=sel.valid.device)
        k_kb, v_kb = _projected(sel, adapter, layer, H, f)                             # [B, H, n, D]
        s_kb = (q @ k_kb.transpose(-1, -2)) * scaling
        return _shifted(KBRead(s_kb, lambda out, p: out + p @ v_kb, sel.values, sel), kb, n_kb, sel.valid)
    e_k, e_v = kb.keys.to(f)[:, None], kb.values.to(f)[:, None]                      # [Bk, 1, N, d_in]
    inv_std = kb.inv_std(adapter).to(f)[:, None]                                       # [Bk, 1, N]
    n_kb = (kb.mask.sum(-1).clamp_min(1).float() if kb.mask is not None
            else torch.full((1,), float(kb.size), device=q.device))[:, None]
    valid = None if kb.mask is None else kb.mask[:, None]
    mode = kb.mode
    d_in = w_k.shape[-1]
    if mode == "auto":
        mode = "project" if H * D * d_in + T * H * D < T * H * d_in else "pullback"
    if mode == "pullback":
        u = torch.einsum("bhtd,hdi->bhti", q, w_k.to(f))
        c = torch.einsum("bhtd,hd->bht", q, b_k.to(f))
        s_kb = (_scores(u, e_k) + c[..., None]) * inv_std[:, :, None, :] * scaling     # [B, H, T, n]

        def add_values(out, p):  # sum_m p_m (W e_m + b) = W (p E) + b sum_m p_m
            pe = _weighted(p, e_v)                                                       # [B, H, T, d_in]
            return out + torch.einsum("bhti,hdi->bhtd", pe, w_v.to(f)) + p.sum(-1, keepdim=True) * b_v.to(f)[None, :, None, :]
        return _shifted(KBRead(s_kb, add_values, e_v), kb, n_kb, valid)
    k_kb = (torch.einsum("hdi,bni->bhnd", w_k.to(f), e_k[:, 0]) + b_k.to(f)[None, :, None, :]) * inv_std[:, :, :, None]
    s_kb = (q @ k_kb.expand(B, -1, -1, -1).transpose(-1, -2)) * scaling
    v_kb = torch.einsum("hdi,bni->bhnd", w_v.to(f), e_v[:, 0]) + b_v.to(f)[None, :, None, :]
    return _shifted(KBRead(s_kb, lambda out, p: out + p @ v_kb.expand(B, -1, -1, -1), e_v), kb, n_kb, valid)


def _shifted(read: KBRead, kb: KBInputs, n_kb: torch.Tensor, valid: torch.Tensor | None) -> KBRead:
    if kb.scale_factor is not None:
        # N in the scores' dtype (exact: a count): fp32 models are bit-identical, fp64 tests exact
        read.shift = _length_shift(kb, n_kb.to(read.scores.device, read.scores.dtype))[:, :, None, None]
        read.scores = read.scores + read.shift
    if valid is not None:
        read.scores = read.scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return read


def _finish(out: torch.Tensor, p_kb: torch.Tensor, read: KBRead, adapter: KBAdapter, layer: int, kb: KBInputs,
            dtype: torch.dtype, f: torch.dtype):
    """The value path's write (once per layer and call), the prefill's attention recorded, the output laid out."""
    extra = adapter.value_path.write(adapter, layer, p_kb, read.value_rows, kb, f)
    if extra is not None:
        out = out + extra
    if kb.record and layer not in kb.attention:  # the first call is the prefill; decode steps do not overwrite it
        B, H, T = p_kb.shape[:3]
        p_rec = p_kb if kb.keep_grad else p_kb.detach()
        if kb.pruned is None:
            kb.recorded.attention[layer] = p_rec.sum(1)                                 # [B, T, N]
        else:  # per group of heads sharing a leaf set: [B, T, G * n] beside positions [B, G * n]
            sel = read.selection
            G = sel.keys.shape[1]
            kb.recorded.attention[layer] = p_rec.view(B, G, H // G, T, -1).sum(2).permute(0, 2, 1, 3).reshape(B, T, -1)
            kb.recorded.selected[layer] = sel.positions.reshape(B, -1)
    return out.to(dtype).transpose(1, 2).contiguous(), None


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
    """min(0, ln s - ln N) added to the KB logits (N: entries the layer attends to, per sample and head group):
    KBs larger than s are damped, smaller ones never boosted (the reference always added ln s - ln N, which
    raised a 10-entry KB's logits; measured worse, benchmarks/results)."""
    return (math.log(kb.scale_factor) - torch.log(n_kb)).clamp_max(0)


def _reuses(kb: KBInputs, layer: int, module: nn.Module) -> bool:
    """A one-token call at this layer can reuse the prefill's kept leaves (_decode_step)."""
    return kb.pruned is not None and ("question" in kb.call.selections or layer in kb.call.selections) \
        and kb.pruned.config.reuse and not torch.is_grad_enabled() and not _softcap(module) \
        and not (kb.record and layer not in kb.attention)  # a one-token prefill still records


def _decode_bias(kb: KBInputs, sel, layer: int, H: int, f: torch.dtype) -> torch.Tensor:
    """[B, H, 1, n]: the length shift on the kept leaves and -inf on padding, once per selection and layer."""
    if ("decode", layer) not in sel.cache:
        valid = sel.valid                                                               # [B, G, n]
        n_kb = valid.sum(-1).clamp_min(1).float() if kb.pruned.config.scale_n == "selected" \
            else torch.full(valid.shape[:2], float(kb.size), device=valid.device)
        bias = torch.zeros(valid.shape, dtype=f, device=valid.device)
        if kb.scale_factor is not None:
            bias = bias + _length_shift(kb, n_kb)[..., None].to(f)
        bias = bias.masked_fill(~valid, float("-inf"))
        G = bias.shape[1]
        bias = bias if G == H else bias.expand(-1, H, -1)
        sel.cache[("decode", layer)] = bias[:, :, None, :]
    return sel.cache[("decode", layer)]


def _selection(kb: KBInputs, layer: int):
    return kb.call.selections["question" if "question" in kb.call.selections else layer]


def _decode_rows(query, key, value, attention_mask, scaling, adapter, layer, q_kb, rows: KBRows, f):
    """One decode step of answers that started apart (serving), as one batch: each row's projected kept
    leaves are stacked once per layer while the batch is the same (padding: -inf bias), so the KB part costs
    a few batched products instead of a dozen small ones per row; the value path's write (per-row matching
    state) runs per row on that row's part of the weights."""
    B, H, _, D = query.shape
    if layer not in rows.stacked:
        parts = []
        for one in rows.rows:
            sel = _selection(one, layer)
            k, v = _projected(sel, adapter, layer, H, f)                                 # [1, H, n_b, D]
            parts.append((k, v, _decode_bias(one, sel, layer, H, f), sel))
        n = max(k.shape[2] for k, _, _, _ in parts)
        k_kb = torch.zeros(B, H, n, D, dtype=f, device=query.device)
        v_kb = torch.zeros(B, H, n, D, dtype=f, device=query.device)
        bias = torch.full((B, H, 1, n), float("-inf"), dtype=f, device=query.device)
        for b, (k, v, bi, _) in enumerate(parts):
            k_kb[b, :, :k.shape[2]], v_kb[b, :, :v.shape[2]], bias[b, :, :, :bi.shape[3]] = k[0], v[0], bi[0]
        rows.stacked[layer] = (k_kb, v_kb, bias, [sel for _, _, _, sel in parts])
    k_kb, v_kb, bias, sels = rows.stacked[layer]
    p, out = _joint_step(query, key, value, attention_mask, scaling, q_kb, k_kb, v_kb, bias, f)
    for b, (one, sel) in enumerate(zip(rows.rows, sels)):
        extra = adapter.value_path.write(adapter, layer, p[b:b + 1, :, :, :sel.values.shape[2]], sel.values, one, f)
        if extra is not None:
            out[b:b + 1] = out[b:b + 1] + extra
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _joint_step(query, key, value, attention_mask, scaling, q_kb, k_kb, v_kb, bias, f):
    """One query token against [KB | text]: p [B, H, 1, n + S], out [B, H, 1, D] (no value-path write)."""
    B, H, _, D = query.shape
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
    return p, out


def _decode_step(query, key, value, attention_mask, scaling, adapter, layer, q_kb, kb, f):
    """One generated token over a pruned KB whose selection the prefill already made: the same joint
    softmax over [KB | text] as kb_attention, as one softmax over the concatenated logits. Decoding on a
    CPU is bound by memory traffic, so nothing is copied to query-head width: the text scores use the
    grouped query layout against the cache's own keys, and the kept leaves' keys/values, length shift and
    padding mask are built once per selection (the two-softmax merge cost about twice as much per step)."""
    sel = _selection(kb, layer)
    H = query.shape[1]
    k_kb, v_kb = _projected(sel, adapter, layer, H, f)                                  # [B, H, n, D]
    p, out = _joint_step(query, key, value, attention_mask, scaling, q_kb, k_kb, v_kb,
                         _decode_bias(kb, sel, layer, H, f), f)
    n = k_kb.shape[2]
    return _finish(out, p[..., :n], KBRead(None, None, sel.values, sel), adapter, layer, kb, query.dtype, f)


def _projected(sel, adapter: KBAdapter, layer: int, H: int, f: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's keys (LayerNorm-scaled) and values of the selected leaves at query-head width,
    [B, H, n, D]; computed on first use and kept with the selection (decode steps reuse it)."""
    if ("proj", layer) not in sel.cache:
        (w_k, b_k), (w_v, b_v) = adapter.layer_weights(layer, "key"), adapter.layer_weights(layer, "value")
        w_k, b_k, w_v, b_v = (t.to(f) for t in (w_k, b_k, w_v, b_v))
        if sel.unique is not None:
            sel.cache[("proj", layer)] = _projected_unique(sel, w_k, b_k, w_v, b_v, f)
            return sel.cache[("proj", layer)]
        e_k, e_v = sel.keys.to(f), sel.values.to(f)                                    # [B, G, n, d_in]
        inv_std = (sel.inv_std if sel.inv_std is not None else                          # [B, G, n]
                   adapter.key_inv_std(e_k.to(adapter.key_proj.weight.dtype))).to(f)
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


def _projected_unique(sel, w_k, b_k, w_v, b_v, f) -> tuple[torch.Tensor, torch.Tensor]:
    """_projected through the selection's distinct leaves: one GEMM each for keys and values over the U leaves
    any sample kept (a batch of questions over one KB keeps many of the same), then every slot takes its row."""
    e_k, e_v, inv = (t.to(f) for t in sel.unique)                                      # [U, d_in], [U, d_v], [U]
    H, D = w_k.shape[:2]
    k_u = ((e_k @ w_k.reshape(H * D, -1).T).view(-1, H, D) + b_k) * inv[:, None, None]  # [U, H, D]
    v_u = (e_v @ w_v.reshape(H * D, -1).T).view(-1, H, D) + b_v
    if sel.index.shape[1] == 1:  # one leaf set for all heads: [B, n, H, D] -> [B, H, n, D]
        at = sel.index[:, 0]
        return k_u[at].transpose(1, 2), v_u[at].transpose(1, 2)
    heads = torch.arange(H, device=sel.index.device)[None, :, None]                    # head h reads its own leaves
    return k_u[sel.index, heads], v_u[sel.index, heads]


def _select(kb: KBInputs, adapter: KBAdapter, layer: int, q: torch.Tensor, w_k: torch.Tensor,
            b_k: torch.Tensor, scaling: float, f: torch.dtype):
    """This layer's kept leaves for every sample (cached: decode steps reuse the prefill's when configured;
    question routing is the same for all layers, so it runs once per call)."""
    cfg = kb.pruned.config
    key = "question" if cfg.route == "question" else layer
    if key in kb.call.selections and (cfg.reuse or cfg.route == "question"):
        return kb.call.selections[key]
    if cfg.route != "kbq" and kb.question_emb is None:
        raise ValueError(f"HiKVP route {cfg.route!r} needs the question's sentence embedding (question_emb)")
    w_kh, b_kh = w_k.to(f), b_k.to(f)
    B, _, T, _ = q.shape
    tm = kb.token_mask
    tm = tm.to(q.dtype) if tm is not None and tm.shape[1] == T else None
    if kb.call.search_memo is None:  # what every KB layer of this call shares (rows read, question cosines)
        kb.call.search_memo = SearchMemo(kb.pruned)
    picks = []
    for b in range(B):
        scorer = None if cfg.route == "question" else \
            LayerScorer(q[b], w_kh, b_kh, scaling, None if tm is None else tm[b])
        qe = None if kb.question_emb is None else kb.question_emb[b].to(q.dtype)
        picks.append(search(kb.pruned, adapter, scorer, qe, cfg.route, kb.call.search_memo, b))
    sel = gather(kb.pruned, picks, max(len(p) for p in picks), kb.call.search_memo, adapter)
    kb.call.selections[key] = sel
    return sel


def _kb_query_hook(module, args, kwargs, *, adapter: KBAdapter, layer: int):
    kb = kb_of(kwargs)
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
        rows = kb.rows if isinstance(kb, KBRows) else [kb]
        terms = [_question_term(adapter, layer, one, q.dtype) for one in rows]
        q = q + (terms[0] if len(terms) == 1 else torch.cat(terms))
    return args, {**kwargs, LAYER_KWARG: (adapter, layer, q, kb)}


def _question_term(adapter: KBAdapter, layer: int, kb: KBInputs, dtype: torch.dtype) -> torch.Tensor:
    """The question's KB-query term of one layer [B, H, 1, D]; the same for every decode step."""
    if kb.question_emb is None:
        raise ValueError("this adapter reads the question's sentence embedding: pass KBInputs(question_emb=...)")
    if layer not in kb.call.question_q or torch.is_grad_enabled():
        kb.call.question_q[layer] = adapter.question_query(kb.question_emb, layer)[:, :, None, :].to(dtype)
    return kb.call.question_q[layer]


def register(base: str) -> str:
    """Register "atlaskv_<base>" (attention + mask function) once; returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("eager", "sdpa"):
        raise ValueError(f"KB attention runs over eager or sdpa base attention, not {base!r}")
    name = ATTN_PREFIX + base
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
    """Make `model` read a KB (see kb_inputs); the model's own weights and modules are untouched."""
    detach(model)
    base = model.config._attn_implementation or "eager"
    base = base[len(ATTN_PREFIX):] if base.startswith(ATTN_PREFIX) else base
    if base not in ("eager", "sdpa"):
        base = "sdpa"
    adapter.config.check_fits(model)
    adapter.bind(model)
    attn = attention_modules(model)
    handles = [model.register_forward_pre_hook(open_call, with_kwargs=True),
               model.register_forward_hook(close_call, with_kwargs=True, always_call=True)]
    handles += [attn[l].register_forward_pre_hook(functools.partial(_kb_query_hook, adapter=adapter, layer=l),
                                                  with_kwargs=True) for l in adapter.config.kb_layers]
    handles += adapter.value_path.hooks(model, adapter)
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
