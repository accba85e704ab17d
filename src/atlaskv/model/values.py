"""The value path: what an attended KB entry writes into the model. One strategy per adapter `value_source`;
the adapter holds the chosen one (`adapter.value_path`) and the attention kernel calls it once per KB layer.

    SentenceValues  "encoder"           KBLaM's value: value_l(e) = W_v e + b_v of the entry's sentence embedding.
                                        The paper's recipe, and where training starts.
    CopyValues      "encoder+llm_copy"  the shipped default. A sentence embedding of "Maine" says "a US state",
                                        and the model then names a neighbour (New Hampshire). So a value also
                                        carries the base LLM's own input embedding t of its next token:
                                            value_l(e) = W_v e_s + b_v + g_l R_l A t
                                        R_l per head = pinv of its o_proj columns (fixed, bound to the model),
                                        A (hidden x hidden) and the gains g_l trained (start: identity, 0).
                                        t follows the answer: an entry writes its *first* token until the text
                                        ends with a prefix of its value, then its next one, and nothing once the
                                        whole value is out (a constant first-token write looped: "Marvel Marvel
                                        Marvel"). At inference the last KB layer's KB attention also votes for
                                        each entry's next token: copy logits, next-token logits += gain x votes.

Every value row a strategy reads is [sentence embedding; its extra columns]. For copy values the extra
columns are E[first token] and the value's token ids as floats (exact below 2^24): the ids of the first
`copy_tokens` tokens of " " + value, after the id of its first token without the space, -1 past the end.
They ride along every KB path (flat, per-sample, pruned gathers) with zero projection weight. Nothing new is
stored in a KB: the token part is derived from the value texts when a model reads the KB.

Removed variants (measured, not recommended; results in docs/results.md): "encoder+llm_tokens" (a constant
token write, commit e5c4604), copy-logit "mix" / "mass" (commit eb53769).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from atlaskv.model.kb_inputs import KBInputs, KBRows, call_kb

# Adam moves a parameter by about lr per step, and the last KB layer needs an absolute gain of a few hundred
# (benchmarks/results/answer_stage/token_values_sweep.json): gains are counted in units of 256.
TOKEN_GAIN_UNIT = 256.0


class TokenValues:
    """value texts -> float32 [n, hidden + copy_tokens + 1]: E[first token of " " + text] and the token ids."""

    def __init__(self, model, tokenizer, copy_tokens: int):
        self.table = model.get_input_embeddings().weight.detach()
        self.tokenizer, self.copy_tokens = tokenizer, copy_tokens
        self.dim = int(self.table.shape[1]) + copy_tokens + 1
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 4096) -> np.ndarray:
        texts = list(texts)
        if len(self._memo) > 1_000_000:  # a long-running server: keep memory bounded
            self._memo.clear()
        uniq = list(dict.fromkeys(t for t in texts if t not in self._memo))
        pad = self.tokenizer.eos_token_id or 0
        m = self.copy_tokens
        for s in range(0, len(uniq), batch_size):
            chunk = uniq[s:s + batch_size]
            ids = self.tokenizer([" " + t.strip() for t in chunk], add_special_tokens=False)["input_ids"]
            bares = self.tokenizer([t.strip() for t in chunk], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                for t, row, bare in zip(chunk, ids, bares):
                    first = torch.tensor(row[:1] or [pad], device=self.table.device)
                    v = self.table[first].float().mean(0).cpu().numpy()
                    ids_m = (row[:m] or [pad]) + [-1] * m
                    self._memo[t] = np.concatenate([v, np.array((bare[:1] or [-1]) + ids_m[:m], np.float32)])
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = self._memo[t]
        return out


def token_values(adapter, model, tokenizer) -> TokenValues:
    """One TokenValues per model (its table and memo are shared by every KB the model reads)."""
    tv = getattr(model, "_atlaskv_token_values", None)
    if tv is None or tv.copy_tokens != adapter.config.copy_tokens:
        tv = TokenValues(model, tokenizer, adapter.config.copy_tokens)
        model._atlaskv_token_values = tv
    return tv


class TokenValueSource:
    """Value rows with the token part appended: stored sentence embeddings from `base`, the token part of the
    rows' value texts (read only for the rows asked for, remembered per row)."""

    def __init__(self, base, value_texts, tokens: TokenValues, memo_rows: int = 200_000):
        self.base, self.value_texts, self.tokens = base, value_texts, tokens
        self.memo: dict[int, np.ndarray] = {}
        self.memo_rows = memo_rows

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        e = self.base.take(positions)
        if len(self.memo) + len(positions) > self.memo_rows:
            self.memo.clear()
        todo = sorted({int(p) for p in positions if int(p) not in self.memo})
        for p, t in zip(todo, self.tokens.encode(self.value_texts(np.array(todo, np.int64))) if todo else []):
            self.memo[p] = t
        t = np.stack([self.memo[int(p)] for p in positions]) if len(positions) else np.zeros((0, self.tokens.dim), np.float32)
        return np.concatenate([e, t], 1)


# ------------------------------------------------------------------------------------------------ strategies
class SentenceValues:
    """value_source "encoder": the value is the projection of the stored sentence embedding, nothing more."""

    source = "encoder"

    def __init__(self, config):
        self.config = config

    @property
    def dim(self) -> int:
        """Width of a value row."""
        return self.config.encoder_dim

    def init_parameters(self, adapter) -> None:
        """Trained weights of the strategy, registered on the adapter (their names are the file's)."""

    def bind(self, adapter, model, attention: list) -> None:
        """Read what the strategy needs off the frozen base model (`attention`: its self-attention modules)."""

    def bound(self, adapter) -> bool:
        return True

    def watched(self, adapter) -> list:
        """Tensors whose change invalidates the adapter's cached layer weights."""
        return []

    def value_weights(self, adapter, layer: int, w: torch.Tensor) -> torch.Tensor:
        """W_v of one layer's slot [rows, encoder_dim] -> the weight over a whole value row [rows, dim]."""
        return w

    def rows(self, adapter, model, tokenizer, view):
        """The value rows a model reads of a KB view (`.take(positions)`)."""
        return view.values

    def embed(self, adapter, model, tokenizer, value_texts: Sequence[str], encoder_values: np.ndarray) -> np.ndarray:
        """The value rows of in-memory records (training batches), from their sentence embeddings and texts."""
        return encoder_values

    def write(self, adapter, layer: int, p_kb: torch.Tensor, values: torch.Tensor, kb: KBInputs, f: torch.dtype):
        """What the attended entries write beyond sum_m p_m W_v e_m: [B, H, T, D], or None."""
        return None

    def hooks(self, model, adapter) -> list:
        """Hooks the strategy needs on the model (removed again by attention.detach)."""
        return []


class CopyValues(SentenceValues):
    """value_source "encoder+llm_copy": see the module docstring."""

    source = "encoder+llm_copy"

    @property
    def dim(self) -> int:
        return self.config.encoder_dim + self.config.hidden_size + self.config.copy_tokens + 1

    def init_parameters(self, adapter) -> None:
        c = self.config
        adapter.token_map = torch.nn.Parameter(torch.eye(c.hidden_size))
        adapter.token_gain = torch.nn.Parameter(torch.zeros(len(c.kb_layers)))
        # pinv(o_proj) per KB layer: derived from the frozen base model (bind), never saved
        adapter.register_buffer("token_readout", torch.full((len(c.kb_layers), c.slot_width, c.hidden_size),
                                                            float("nan")), persistent=False)

    def bind(self, adapter, model, attention: list) -> None:
        """R_l off `model`: per KB head h, R_l,h = pinv(o_proj_l's columns of h), so head h alone writes the
        projection of A t onto its output space, <P_h t, t> >= 0 (one pinv of the whole o_proj, exact only
        when all heads agree, summed to noise). Also the rows of the tokens to write next, and the ids that
        open or close a chat turn: the copy match restarts there, so a value the question names does not
        count as already said in the answer."""
        c = self.config
        adapter.__dict__["token_table"] = model.get_input_embeddings().weight  # a reference, never saved
        turn = set()
        for cfg in (model.config, getattr(model, "generation_config", None)):
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(cfg, k, None) if cfg is not None else None
                turn.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
        adapter.__dict__["turn_ids"] = torch.tensor(sorted(int(t) for t in turn), dtype=torch.long)
        with torch.no_grad():
            for i, l in enumerate(c.kb_layers):
                w_o = attention[l].o_proj.weight.detach().to(adapter.token_readout.device, torch.float64)  # [hidden, H*D]
                w_o = w_o.view(c.hidden_size, c.num_heads, c.head_dim)
                r = torch.stack([torch.linalg.pinv(w_o[:, h]) for h in range(c.num_heads)])  # [H, D, hidden]
                adapter.token_readout[i] = r.reshape(c.slot_width, c.hidden_size).to(adapter.token_readout.dtype)

    def bound(self, adapter) -> bool:
        return not bool(torch.isnan(adapter.token_readout).any())

    def watched(self, adapter) -> list:
        return [adapter.token_map, adapter.token_gain, adapter.token_readout]

    def value_weights(self, adapter, layer: int, w: torch.Tensor) -> torch.Tensor:
        """[W_v | g_l R_l A | 0]: linear in [sentence emb; token emb; ids], so every exact trick of the kernel
        holds for it; the id columns only ride along."""
        i = self.config.kb_layers.index(layer)
        w = torch.cat([w, TOKEN_GAIN_UNIT * adapter.token_gain[i] * (adapter.token_readout[i] @ adapter.token_map)], 1)
        return torch.cat([w, w.new_zeros(w.shape[0], self.config.copy_tokens + 1)], 1)

    def rows(self, adapter, model, tokenizer, view):
        return TokenValueSource(view.values, view.value_texts, token_values(adapter, model, tokenizer))

    def embed(self, adapter, model, tokenizer, value_texts: Sequence[str], encoder_values: np.ndarray) -> np.ndarray:
        t = token_values(adapter, model, tokenizer).encode(value_texts)
        return np.concatenate([np.asarray(encoder_values, np.float32), t], 1)

    def write(self, adapter, layer: int, p_kb: torch.Tensor, values: torch.Tensor, kb: KBInputs, f: torch.dtype):
        """The static value wrote g R A E[first token]. Per entry, j = the longest prefix of its token ids that
        the text ends with (the first token also matches without its leading space); where j > 0 this adds
        g R A (E[token j] - E[first token]), or cancels the write once the whole value is out, and from then on.
        The matching state carries over decode steps (T = 1) and restarts where a chat turn opens or closes.
        p_kb: [B, H, T, n]; values: [Bk, G, n, d] with the id columns last."""
        c = self.config
        write = bool(adapter.token_gain[c.kb_layers.index(layer)].detach() != 0)
        point = c.copy_logit_gain > 0 and layer == c.kb_layers[-1] and not torch.is_grad_enabled()  # inference only
        if kb.call.ids is None or not (write or point):
            return None
        m = c.copy_tokens
        ids = values[..., -(m + 1):].round().long()                                    # [Bk, G, n, m + 1]
        bare, vid = ids[..., 0], ids[..., 1:]
        length = (vid >= 0).sum(-1)                                                     # [Bk, G, n]
        j, was_done, jt, done = self._match(adapter, layer, kb, bare, vid, length, p_kb.shape[2])
        if point:
            kb.call.copy_boost = self._votes(adapter, p_kb, vid, jt, length, done)
        if not write:
            return None
        return self._token_write(adapter, layer, p_kb, vid, length, j, was_done, f)

    def _match(self, adapter, layer, kb: KBInputs, bare, vid, length, T: int):
        """Prefix matching of every entry's value against the text, token by token: j [B, G, T, n] (the
        prefix matched after each position), was_done (the whole value appeared before it), and the state
        after the call's last token."""
        m = self.config.copy_tokens
        x = kb.call.ids.to(vid.device)                                                  # [B, T]
        B, G, n = x.shape[0], vid.shape[1], vid.shape[2]
        prev = kb.call.copy_match.get(layer) if T == 1 else None
        if prev is None or prev[0].shape[-2] != n:
            prev = (torch.zeros((B, G, n, m), dtype=torch.bool, device=vid.device),
                    torch.zeros((B, G, n), dtype=torch.bool, device=vid.device))
        state, done = prev
        steps = torch.arange(1, m + 1, device=vid.device)
        js, dones = [], []
        new_turn = torch.isin(x, adapter.turn_ids.to(x.device))                         # [B, T]
        turn_at = new_turn.any(0).tolist()  # one host sync per call, not one per token
        for t in range(T):
            tok = x[:, t, None, None]                                                   # [B, 1, 1]
            if turn_at[t]:  # a chat turn opens or closes: nothing of any value is out yet
                fresh = ~new_turn[:, t, None, None]
                state, done = state & fresh[..., None], done & fresh
            first = (vid[..., 0] == tok) | (bare == tok)
            state = torch.cat([first[..., None], state[..., :-1] & (vid[..., 1:] == tok[..., None])], -1)
            jt = (state * steps).amax(-1)                                               # [B, G, n]
            js.append(jt)
            dones.append(done)
            done = done | ((jt > 0) & (jt >= length))
        kb.call.copy_match[layer] = (state, done)
        return torch.stack(js, 2), torch.stack(dones, 2), jt, done

    def _token_write(self, adapter, layer, p_kb, vid, length, j, was_done, f):
        m = self.config.copy_tokens
        B, H, T, n = p_kb.shape
        G = vid.shape[1]
        b, g, t, e = ((j > 0) | was_done).nonzero(as_tuple=True)
        if len(b) == 0:
            return None
        table = adapter.token_table.detach().to(f)
        bk = b if vid.shape[0] > 1 else torch.zeros_like(b)
        jj = j[b, g, t, e]
        finished = (jj >= length[bk, g, e]) | was_done[b, g, t, e]
        nxt = vid[bk, g, e, jj.clamp(max=m - 1)]
        delta = torch.where(finished[:, None], 0.0, table[nxt.clamp_min(0)]) - table[vid[bk, g, e, 0]]  # [K, hidden]
        corr = torch.zeros((B, T, H, table.shape[1]), dtype=f, device=p_kb.device)
        if G == 1:  # every head read this entry
            corr.index_put_((b, t), p_kb[b, :, t, e][..., None] * delta[:, None, :], accumulate=True)
        else:       # head g read its own leaves
            corr.index_put_((b, t, g), p_kb[b, g, t, e][:, None] * delta, accumulate=True)
        w_v, _ = adapter.layer_weights(layer, "value")
        c = self.config
        w_tok = w_v[..., c.encoder_dim:c.encoder_dim + c.hidden_size].to(f)           # [H, D, hidden]
        return torch.einsum("bthc,hdc->bhtd", corr, w_tok)

    def _votes(self, adapter, p_kb, vid, j, length, done) -> torch.Tensor:
        """Copy logits: each entry votes for its next value token (its first until the text ends with a prefix
        of it, nothing once all of it is out) with its share of the last KB layer's KB attention at the call's
        last position. Unlike the residual write this skips the last layers and the final norm, so the gain
        reads in nats. Returns the votes [B, vocab]."""
        B = p_kb.shape[0]
        w = p_kb[:, :, -1, :]                                                           # [B, H, n]
        G = vid.shape[1]
        w = w.sum(1, keepdim=True) if G == 1 else w                                     # [B, G, n]
        w = w / w.sum((1, 2), keepdim=True).clamp_min(1e-30)  # the entry's share of the KB part
        bk = vid if vid.shape[0] == B else vid.expand(B, -1, -1, -1)
        nxt = torch.gather(bk, -1, j.clamp(max=bk.shape[-1] - 1)[..., None])[..., 0]    # [B, G, n]
        nxt = torch.where(j >= length, -1, nxt)
        keep = (~done) & (nxt >= 0)
        # once one entry's whole value is out the answer has its fact: no more votes (they appended other
        # values: "Chicago United States Dollar")
        keep = keep & ~done.flatten(1).any(1)[:, None, None]
        V = adapter.token_table.shape[0]
        boost = torch.zeros((B, V), dtype=torch.float32, device=p_kb.device)
        bb = torch.arange(B, device=p_kb.device)[:, None, None].expand_as(nxt)
        boost.index_put_((bb[keep], nxt[keep]), w[keep].float(), accumulate=True)
        return boost

    def hooks(self, model, adapter) -> list:
        """Copy logits: the last KB layer's votes raise the next-token logits, on the LM head's output."""
        return [model.get_output_embeddings().register_forward_hook(
            functools.partial(_copy_logits_hook, config=self.config))]


def _copy_logits_hook(module, args, output, *, config):
    kb = call_kb()
    if kb is None:
        return None
    # a batched decode step of requests that started apart (KBRows): each row adds its own KB's votes
    parts = list(enumerate(kb.rows)) if isinstance(kb, KBRows) else [(None, kb)]
    if all(one.call.copy_boost is None for _, one in parts):
        return None
    output = output.clone()
    for b, one in parts:
        boost, one.call.copy_boost = one.call.copy_boost, None
        if boost is None:
            continue
        out = output if b is None else output[b:b + 1]
        if out.shape[0] != boost.shape[0] or out.shape[-1] < boost.shape[1]:
            continue
        added = (config.copy_logit_gain * boost).to(out.dtype)
        out[:, -1, :boost.shape[1]] += added
        one.call.copy_added = added  # value decoding takes them back where the answer restates the question
    return output


VALUE_PATHS = {s.source: s for s in (SentenceValues, CopyValues)}
REMOVED_VALUE_SOURCES = {"encoder+llm_tokens": "a constant token write, superseded by encoder+llm_copy (commit e5c4604)"}


def value_path_for(config) -> SentenceValues:
    return VALUE_PATHS[config.value_source](config)


def value_rows(adapter, model, tokenizer, view):
    """The value rows `adapter` reads of a KB view (its strategy's)."""
    return adapter.value_path.rows(adapter, model, tokenizer, view)
