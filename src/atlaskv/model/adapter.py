"""KBAdapter: the only trained weights. Key/value projectors from sentence-encoder space into every KB
layer's attention, and a KB query head per KB layer (method.md §1.2-1.3, §2.2).

    key(e)   = LayerNorm(W_k e + b_k)   over the whole [n_slots * kb_heads * head_dim] vector, no affine
    value(e) = W_v e + b_v
    KB layer l uses slot l // freq; within a slot the vector is head-major [kb_heads, head_dim].

Token values (`value_source` "encoder+llm_tokens", ours): a sentence embedding of "Maine" says "a US
state", and the model then names a neighbour (New Hampshire). So e_v is [sentence embedding; t], t the
mean of the base LLM's own input embeddings of the value's first tokens (values.py), and

    value_l(e) = W_v e_s + b_v + g_l R_l A t       R_l: per head, pinv of its o_proj columns (fixed, bind())

R_l makes the KB value land in the residual stream along g_l A t: with tied input/output embeddings
(SmolLM2, Gemma) a direction that raises the answer token's logit. Trained: A (hidden x hidden, starts as the
identity) and the gains g_l (start at 0: training starts exactly from the sentence-value adapter).
It stays linear in e_v, so every exact trick below holds for it.

Copy values (`value_source` "encoder+llm_copy", ours): the same, but t follows the answer. A fixed t keeps
pushing the first token after it is out ("Marvel Marvel Marvel"); here each entry writes its next token
once the text ends with the start of its value, and nothing once the whole value is out (attention.py,
_copy_write; the token ids ride in the values' last copy_tokens + 1 columns with zero weight).

The projected KB is never materialised: `KeyStats` gives the LayerNorm's per-entry mean and scale in
closed form from the weights, so one layer's slice of a key is exact without projecting the others, and
attention can score keys in base-embedding space (see attention.py).

Deviations from the reference, on purpose:
  * exactly one slot per KB layer (the reference allocates L // freq + 1 slots; the unused one still
    entered the LayerNorm statistics);
  * `kb_heads="kv"` (optional) sizes KB keys/values at key-value-head width (GQA), 4-9x smaller.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20
MAX_PARAMS = 2_000_000_000  # anything larger is not an adapter we wrote


class AdapterError(RuntimeError):
    pass


@dataclass
class AdapterConfig:
    base_model: str
    encoder: str
    encoder_dim: int
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool = False
    kb_layer_frequency: int = 3
    kb_heads: str = "query"            # "query" (reference, MHA width) or "kv" (GQA width)
    kb_scale_factor: float | None = None   # inference: KB logits += ln(s) - ln(N) (method.md §1.6)
    kb_scale_mode: str = "shift"       # "shift" always (reference); "cap" only when N > s (never boosts small KBs)
    question_input: bool = False       # KB queries also see the sentence encoder's embedding of the question
    value_source: str = "encoder"      # or "encoder+llm_tokens": values also carry the LLM's token embeddings
    value_tokens: int = 1              # token values: how many of the value's first tokens are averaged (1 measured best)
    copy_tokens: int = 8               # "encoder+llm_copy": how many of the value's tokens are written one after another
    copy_logit_gain: float = 0.0       # copy values, inference: next-token logits += gain x each entry's share of the
                                       # last KB layer's KB attention, on that entry's next value token (0: off)
    copy_logit_norm: str = "kb"        # the share: of the KB attention ("kb") or of all attention ("mass")
    copy_logit_mode: str = "add"       # "add": logits += gain x votes; "mix": p = (1 - gain) p_model + gain x votes
    layer_norm_eps: float = 1e-5
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def kb_layers(self) -> list[int]:
        return [l for l in range(self.num_layers) if l % self.kb_layer_frequency == 0]

    def slot(self, layer: int) -> int:
        return layer // self.kb_layer_frequency

    @property
    def token_values(self) -> bool:
        return self.value_source in ("encoder+llm_tokens", "encoder+llm_copy")

    @property
    def copy_values(self) -> bool:
        return self.value_source == "encoder+llm_copy"

    @property
    def value_dim(self) -> int:
        """Width of a value's base embedding: [sentence embedding; token embedding] for token values, and
        for copy values also the value's token ids (values.py: `copy_tokens` + 1 columns, zero weight)."""
        return (self.encoder_dim + (self.hidden_size if self.token_values else 0)
                + (self.copy_tokens + 1 if self.copy_values else 0))

    @property
    def n_kb_heads(self) -> int:
        return self.num_heads if self.kb_heads == "query" else self.num_kv_heads

    @property
    def slot_width(self) -> int:
        return self.n_kb_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        return len(self.kb_layers) * self.slot_width

    @classmethod
    def for_model(cls, model, encoder: str, encoder_dim: int, base_model: str = "", **kw) -> "AdapterConfig":
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        attn = _attention_modules(model)[0]
        return cls(base_model=base_model or getattr(c, "_name_or_path", "") or c.model_type,
                   encoder=encoder, encoder_dim=encoder_dim, model_type=c.model_type,
                   num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", heads) or heads, head_dim=head_dim,
                   q_bias=attn.q_proj.bias is not None, **kw)

    def check_fits(self, model) -> None:
        other = AdapterConfig.for_model(model, self.encoder, self.encoder_dim)
        for k in ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, k) != getattr(other, k):
                raise AdapterError(f"adapter was trained for {self.base_model!r} ({k}={getattr(self, k)}), "
                                   f"this model has {k}={getattr(other, k)}")


# Adam moves a parameter by about lr per step, and the last KB layer needs an absolute gain of a few hundred
# (benchmarks/results/answer_stage/token_values_sweep.json): gains are counted in units of 256.
TOKEN_GAIN_UNIT = 256.0
VALUE_SOURCES = ("encoder", "encoder+llm_tokens", "encoder+llm_copy")
_INT_LIMITS = {"value_tokens": 1024, "copy_tokens": 64, "encoder_dim": 1 << 16, "num_layers": 1024, "hidden_size": 1 << 16, "num_heads": 1024,
               "num_kv_heads": 1024, "head_dim": 4096, "kb_layer_frequency": 1024}


def _check_config_values(config: AdapterConfig, cfg_file: Path) -> None:
    """Types and ranges of an untrusted config, before any tensor is sized from it."""
    for k, hi in _INT_LIMITS.items():
        v = getattr(config, k)
        if type(v) is not int or not 1 <= v <= hi:
            raise AdapterError(f"{cfg_file}: {k} is {v!r}, expected an integer from 1 to {hi}")
    for k in ("base_model", "encoder", "model_type", "kb_heads", "kb_scale_mode", "value_source"):
        if not isinstance(getattr(config, k), str):
            raise AdapterError(f"{cfg_file}: {k} must be a string")
    if config.value_source not in VALUE_SOURCES:
        raise AdapterError(f"{cfg_file}: value_source is {config.value_source!r}, expected one of {VALUE_SOURCES}")
    if config.copy_values and config.value_tokens != 1:
        raise AdapterError(f"{cfg_file}: copy values write one token at a time, value_tokens must be 1")
    for k in ("q_bias", "question_input"):
        if not isinstance(getattr(config, k), bool):
            raise AdapterError(f"{cfg_file}: {k} must be true or false")
    eps, scale = config.layer_norm_eps, config.kb_scale_factor
    if not (isinstance(eps, (int, float)) and 0 < eps < 1) or not (
            scale is None or (isinstance(scale, (int, float)) and 0 < scale < 1e12)):
        raise AdapterError(f"{cfg_file}: layer_norm_eps / kb_scale_factor out of range")
    gain = config.copy_logit_gain
    if not (isinstance(gain, (int, float)) and not isinstance(gain, bool) and 0 <= gain < 1e6):
        raise AdapterError(f"{cfg_file}: copy_logit_gain is {gain!r}, expected a number from 0 to 10^6")
    if config.copy_logit_mode not in ("add", "mix") or (config.copy_logit_mode == "mix" and not gain < 1):
        raise AdapterError(f"{cfg_file}: copy_logit_mode is {config.copy_logit_mode!r} with gain {gain!r}, "
                           "expected 'add', or 'mix' with a gain below 1")
    if config.copy_logit_norm not in ("kb", "mass"):
        raise AdapterError(f"{cfg_file}: copy_logit_norm is {config.copy_logit_norm!r}, expected 'kb' or 'mass'")
    if not isinstance(config.training, dict):
        raise AdapterError(f"{cfg_file}: training must be an object")


def _attention_modules(model) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order (llama, qwen2/3, gemma3 ...)."""
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "q_proj")]
    if not mods:
        raise AdapterError(f"{type(model).__name__}: no decoder self-attention modules with q_proj found")
    return mods


class KBAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = c = config
        self.key_proj = nn.Linear(c.encoder_dim, c.out_dim)
        self.value_proj = nn.Linear(c.encoder_dim, c.out_dim)
        self.kb_query = nn.ModuleDict({str(l): nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.q_bias)
                                       for l in c.kb_layers})
        for p in (self.key_proj, self.value_proj):
            nn.init.normal_(p.weight, std=1 / math.sqrt(c.encoder_dim))
            nn.init.zeros_(p.bias)
        if c.question_input:
            # starts at zero: training begins from the plain recipe and learns how much of the retriever to use
            self.question_proj = nn.Linear(c.encoder_dim, len(c.kb_layers) * c.num_heads * c.head_dim)
            nn.init.zeros_(self.question_proj.weight)
            nn.init.zeros_(self.question_proj.bias)
        if c.token_values:
            self.token_map = nn.Parameter(torch.eye(c.hidden_size))
            self.token_gain = nn.Parameter(torch.zeros(len(c.kb_layers)))
            # pinv(o_proj) per KB layer: derived from the frozen base model (bind), never saved
            self.register_buffer("token_readout", torch.full((len(c.kb_layers), c.slot_width, c.hidden_size),
                                                             float("nan")), persistent=False)

    def bind(self, model) -> "KBAdapter":
        """Token values: read R_l off `model`. Per KB head h, R_l,h = pinv(o_proj_l's columns of h), so head
        h alone writes the projection of A t onto its output space, <P_h t, t> >= 0. Heads weigh KB entries
        differently, so one pinv of the whole o_proj (exact only when all heads agree) sums to noise."""
        if not self.config.token_values:
            return self
        c = self.config
        # copy values: the rows of the tokens to write next (attention.py); a reference, never saved
        self.__dict__["token_table"] = model.get_input_embeddings().weight
        # and the ids that open or close a chat turn: the copy match restarts there, so a value the question
        # names does not count as already said in the answer
        turn = set()
        for cfg in (model.config, getattr(model, "generation_config", None)):
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(cfg, k, None) if cfg is not None else None
                turn.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
        self.__dict__["turn_ids"] = torch.tensor(sorted(int(t) for t in turn), dtype=torch.long)
        attn = _attention_modules(model)
        with torch.no_grad():
            for i, l in enumerate(c.kb_layers):
                w_o = attn[l].o_proj.weight.detach().to(self.token_readout.device, torch.float64)  # [hidden, H*D]
                w_o = w_o.view(c.hidden_size, c.n_kb_heads, -1, c.head_dim).sum(2)  # kv layout: a group's heads share
                r = torch.stack([torch.linalg.pinv(w_o[:, h]) for h in range(c.n_kb_heads)])  # [Hk, D, hidden]
                self.token_readout[i] = r.reshape(c.slot_width, c.hidden_size).to(self.token_readout.dtype)
        return self

    def question_query(self, question_emb: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, heads, head_dim] added to every KB query of `layer`."""
        c = self.config
        width = c.num_heads * c.head_dim
        i = c.kb_layers.index(layer)
        w = self.question_proj.weight[i * width:(i + 1) * width]
        b = self.question_proj.bias[i * width:(i + 1) * width]
        return (question_emb.to(w.dtype) @ w.T + b).view(-1, c.num_heads, c.head_dim)

    @classmethod
    def for_model(cls, model, encoder: str, encoder_dim: int, **kw) -> "KBAdapter":
        """A fresh adapter whose KB query heads start as copies of each KB layer's q_proj (§1.3)."""
        adapter = cls(AdapterConfig.for_model(model, encoder, encoder_dim, **kw))
        attn = _attention_modules(model)
        with torch.no_grad():
            for l in adapter.config.kb_layers:
                q = attn[l].q_proj
                adapter.kb_query[str(l)].weight.copy_(q.weight)
                if q.bias is not None:
                    adapter.kb_query[str(l)].bias.copy_(q.bias)
        return adapter.to(next(model.parameters()).device)

    # ---------------------------------------------------------------- projections of base embeddings
    def _cached(self, key, fn):
        """Memoise weight-only quantities at inference (no grad); recomputed whenever a weight changes."""
        if torch.is_grad_enabled():
            return fn()
        watched = [self.key_proj.weight, self.key_proj.bias, self.value_proj.weight, self.value_proj.bias]
        if self.config.token_values:
            watched += [self.token_map, self.token_gain, self.token_readout]
        stamp = tuple((p._version, p.data_ptr()) for p in watched)
        cache = self.__dict__.setdefault("_weight_cache", {})
        if cache.get("stamp") != stamp:
            cache.clear()
            cache["stamp"] = stamp
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def layer_weights(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached(("layer", layer, which), lambda: self._layer_weights(layer, which))

    def _layer_weights(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [kb_heads, head_dim, d_in], b [kb_heads, head_dim]) of one KB layer's slot.

        For keys the rows are centred by the LayerNorm mean row, so W e + b is the LayerNorm numerator.
        """
        c = self.config
        lin = self.key_proj if which == "key" else self.value_proj
        s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
        w, b = lin.weight[s], lin.bias[s]
        if which == "key":
            w = w - lin.weight.mean(0, keepdim=True)
            b = b - lin.bias.mean()
        elif c.token_values:  # [W_v | g_l R_l A]: the value is linear in [sentence emb; token emb]
            i = c.kb_layers.index(layer)
            if torch.isnan(self.token_readout[i]).any():
                raise AdapterError("token-value adapter not bound to its base model (attach() or bind(model) first)")
            w = torch.cat([w, TOKEN_GAIN_UNIT * self.token_gain[i] * (self.token_readout[i] @ self.token_map)], 1)
            if c.copy_values:  # the token-id columns only ride along (attention.py reads them)
                w = torch.cat([w, w.new_zeros(w.shape[0], c.copy_tokens + 1)], 1)
        return w.reshape(c.n_kb_heads, c.head_dim, -1), b.reshape(c.n_kb_heads, c.head_dim)

    def key_inv_std(self, e: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(var(W_k e + b_k) + eps) per entry, over the full out_dim, without projecting.

        var = |W_c e + b_c|^2 / D with W_c, b_c centred: e^T G e + 2 (W_c^T b_c) e + |b_c|^2, G = W_c^T W_c.
        """
        gram, lin, const = self._cached("gram", self._gram)
        out = torch.empty(e.shape[:-1], dtype=e.dtype, device=e.device)
        flat, flat_out = e.reshape(-1, e.shape[-1]), out.view(-1)
        for s in range(0, len(flat), 16384):  # float64 in chunks: 10^5 centroids at once cost 0.3 GB
            ed = flat[s:s + 16384].double()
            sq = ((ed @ gram) * ed).sum(-1) + 2 * ed @ lin + const
            var = (sq / self.config.out_dim).clamp_min(0)
            flat_out[s:s + 16384] = torch.rsqrt(var + self.config.layer_norm_eps).to(e.dtype)
        return out

    def _gram(self):
        w = self.key_proj.weight.double()
        b = self.key_proj.bias.double()
        wc, bc = w - w.mean(0, keepdim=True), b - b.mean()
        return wc.T @ wc, wc.T @ bc, bc @ bc

    def project_keys(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        """Materialised keys [..., kb_heads, head_dim] of one layer (tests, and the few pruned leaves)."""
        w, b = self.layer_weights(layer, "key")
        k = torch.einsum("hdi,...i->...hd", w, e) + b
        return k * self.key_inv_std(e)[..., None, None]

    def project_values(self, e: torch.Tensor, layer: int) -> torch.Tensor:
        w, b = self.layer_weights(layer, "value")
        return torch.einsum("hdi,...i->...hd", w, e) + b

    def full_keys(self, e: torch.Tensor) -> torch.Tensor:
        """The reference computation: LayerNorm over the whole projected vector (for tests)."""
        return nn.functional.layer_norm(self.key_proj(e), (self.config.out_dim,), eps=self.config.layer_norm_eps)

    # ---------------------------------------------------------------- save / load
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """config + safetensors; `dtype` (e.g. torch.float16) halves the file, loading upcasts to fp32."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        tmp_w, tmp_c = path / f".{WEIGHTS_NAME}.tmp", path / f".{CONFIG_NAME}.tmp"
        save_file(tensors, tmp_w, metadata={"format": "atlaskv-adapter", "format_version": str(FORMAT_VERSION)})
        tmp_c.write_text(json.dumps(asdict(self.config), indent=1) + "\n", encoding="utf-8")
        tmp_w.replace(path / WEIGHTS_NAME)
        tmp_c.replace(path / CONFIG_NAME)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, model=None, encoder: str | None = None,
                        device: str | torch.device = "cpu") -> "KBAdapter":
        """Load config + safetensors (never pickle); check it fits `model` and the KB's `encoder`."""
        path = Path(path)
        cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise AdapterError(f"{f}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
            if path.resolve() not in f.resolve().parents:  # a symlink to somewhere else
                raise AdapterError(f"{f}: resolves to {f.resolve()}, outside the adapter folder {path}")
        if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{cfg_file}: {cfg_file.stat().st_size} bytes is not an adapter config")
        try:
            raw = json.loads(cfg_file.read_text("utf-8"))
            config = AdapterConfig(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{cfg_file}: not a valid adapter config ({e})") from e
        if config.format_version != FORMAT_VERSION:
            raise AdapterError(f"{cfg_file}: format_version {config.format_version}, this atlaskv reads {FORMAT_VERSION}")
        _check_config_values(config, cfg_file)
        expected_params = 2 * (config.encoder_dim + 1) * config.out_dim + len(config.kb_layers) * (
            config.hidden_size + config.q_bias + config.encoder_dim + 1) * config.num_heads * config.head_dim \
            + (config.hidden_size ** 2 + len(config.kb_layers)) * config.token_values
        if not 0 < expected_params < MAX_PARAMS or config.kb_heads not in ("query", "kv"):
            raise AdapterError(f"{cfg_file}: implausible adapter shape ({expected_params:,} parameters)")
        if model is not None:
            config.check_fits(model)
        if encoder is not None and encoder != config.encoder:
            raise AdapterError(f"adapter {path} was trained on {config.encoder!r} embeddings; the KB was "
                               f"built with {encoder!r} (rebuild the KB with --encoder {config.encoder})")
        adapter = cls(config)
        # fp32 at most, plus a header: a larger file is not these weights (and is not read into memory)
        if w_file.stat().st_size > 4 * expected_params + (1 << 20):
            raise AdapterError(f"{w_file}: {w_file.stat().st_size:,} bytes, more than the {expected_params:,} "
                               f"parameters of {CONFIG_NAME} can take")
        try:
            state = {k: v.float() for k, v in load_file(w_file, device="cpu").items()}
        except Exception as e:  # safetensors raises its own error types for a damaged or foreign file
            raise AdapterError(f"{w_file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        try:
            missing, unexpected = adapter.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise AdapterError(f"{w_file}: weights do not match {CONFIG_NAME} ({str(e).splitlines()[-1].strip()})") from e
        if missing or unexpected:
            raise AdapterError(f"{w_file}: weights do not match the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        return adapter.to(device)
