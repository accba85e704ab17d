"""KBAdapter: the only trained weights. Key/value projectors from sentence-encoder space into every KB
layer's attention, and a KB query head per KB layer (method.md §1.2-1.3, §2.2).

    key(e)   = LayerNorm(W_k e + b_k)   over the whole [n_slots * heads * head_dim] vector, no affine
    value(e) = W_v e + b_v              widened by the value path (values.py; the default also writes the
                                        value's next token: copy values, copy logits)
    KB layer l uses slot l // freq; within a slot the vector is head-major [heads, head_dim].

The projected KB is never materialised: `key_inv_std` gives the LayerNorm's per-entry scale in closed form
from the weights, so one layer's slice of a key is exact without projecting the others, and attention can
score keys in base-embedding space (see attention.py).

Deviations from the reference, on purpose: exactly one slot per KB layer (the reference allocates
L // freq + 1 slots; the unused one still entered the LayerNorm statistics).

Removed options (measured, not recommended; results in docs/results.md): kb_heads "kv" (GQA-width KB keys,
commit 2ddad5d and before), kb_scale_mode "shift" (the reference's length correction that also boosts small
KBs), copy_logit_norm "mass" and copy_logit_mode "mix". Adapter files that name their single remaining value
still load.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atlaskv.model.values import REMOVED_VALUE_SOURCES, VALUE_PATHS, value_path_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
# the relations of the facts the adapter was trained on, one per line (optional): the kinds of fact it learned
# to tell apart, which the refusal rule's lacking-key check compares (model/probes.py)
RELATIONS_NAME = "trained_relations.txt"
# how often two relations share a head in the training facts (optional; "relation<TAB>other<TAB>heads", the
# pair (r, r) counting the heads that hold r): which kinds of fact an entity may hold together, so the
# lacking-key check does not ask a film for the TV show it appears in (model/probes.py)
PAIRS_NAME = "relation_pairs.tsv"
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
    kb_scale_factor: float | None = None   # inference: KB logits += min(0, ln s - ln N) (method.md §1.6)
    question_input: bool = False       # KB queries also see the sentence encoder's embedding of the question
    value_source: str = "encoder"      # the value path (values.py): "encoder" or "encoder+llm_copy"
    copy_tokens: int = 8               # "encoder+llm_copy": how many of the value's tokens are written one after another
    copy_logit_gain: float = 0.0       # copy values, inference: next-token logits += gain x each entry's share of the
                                       # last KB layer's KB attention, on that entry's next value token (0: off)
    layer_norm_eps: float = 1e-5
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def kb_layers(self) -> list[int]:
        return [l for l in range(self.num_layers) if l % self.kb_layer_frequency == 0]

    def slot(self, layer: int) -> int:
        return layer // self.kb_layer_frequency

    @property
    def copy_values(self) -> bool:
        return self.value_source == "encoder+llm_copy"

    @property
    def value_dim(self) -> int:
        """Width of a value row the adapter reads (the value path's: values.py)."""
        return value_path_for(self).dim

    @property
    def slot_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        return len(self.kb_layers) * self.slot_width

    @classmethod
    def for_model(cls, model, encoder: str, encoder_dim: int, base_model: str = "", **kw) -> "AdapterConfig":
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        attn = attention_modules(model)[0]
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


VALUE_SOURCES = tuple(VALUE_PATHS)
# removed options: files that name the one value still supported load, any other value is refused
LEGACY_FIELDS = {"kb_heads": "query", "kb_scale_mode": "cap", "copy_logit_norm": "kb", "copy_logit_mode": "add",
                 "value_tokens": 1}
_INT_LIMITS = {"copy_tokens": 64, "encoder_dim": 1 << 16, "num_layers": 1024, "hidden_size": 1 << 16, "num_heads": 1024,
               "num_kv_heads": 1024, "head_dim": 4096, "kb_layer_frequency": 1024}


def _check_config_values(config: AdapterConfig, cfg_file: Path) -> None:
    """Types and ranges of an untrusted config, before any tensor is sized from it."""
    for k, hi in _INT_LIMITS.items():
        v = getattr(config, k)
        if type(v) is not int or not 1 <= v <= hi:
            raise AdapterError(f"{cfg_file}: {k} is {v!r}, expected an integer from 1 to {hi}")
    for k in ("base_model", "encoder", "model_type", "value_source"):
        if not isinstance(getattr(config, k), str):
            raise AdapterError(f"{cfg_file}: {k} must be a string")
    if config.value_source in REMOVED_VALUE_SOURCES:
        raise AdapterError(f"{cfg_file}: value_source {config.value_source!r} was removed "
                           f"({REMOVED_VALUE_SOURCES[config.value_source]}); expected one of {VALUE_SOURCES}")
    if config.value_source not in VALUE_SOURCES:
        raise AdapterError(f"{cfg_file}: value_source is {config.value_source!r}, expected one of {VALUE_SOURCES}")
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
    if not isinstance(config.training, dict):
        raise AdapterError(f"{cfg_file}: training must be an object")


def legacy_fields(raw: dict, cfg_file: Path) -> dict:
    """A config without the fields of removed options, which must hold their one remaining value."""
    raw = dict(raw)
    if raw.get("kb_scale_mode") == "shift" and raw.get("kb_scale_factor") is None:
        raw.pop("kb_scale_mode")  # no length correction at all: the mode never mattered
    for k, only in LEGACY_FIELDS.items():
        if k in raw and raw.pop(k) != only:
            raise AdapterError(f"{cfg_file}: {k} other than {only!r} was removed from atlaskv (docs/results.md "
                               "has what it measured)")
    return raw


def attention_modules(model) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order (llama, qwen2/3, gemma3 ...)."""
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "q_proj")]
    if not mods:
        raise AdapterError(f"{type(model).__name__}: no decoder self-attention modules with q_proj found")
    return mods


class KBAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = c = config
        self.trained_relations: frozenset[str] = frozenset()  # RELATIONS_NAME; empty: not recorded
        self.relation_pairs: Counter[tuple[str, str]] = Counter()  # PAIRS_NAME; empty: not recorded
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
        self.value_path = value_path_for(c)
        self.value_path.init_parameters(self)

    def bind(self, model) -> "KBAdapter":
        """Read what the value path needs off the frozen base `model` (copy values: per-head pinv(o_proj))."""
        self.value_path.bind(self, model, attention_modules(model))
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
        attn = attention_modules(model)
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
        watched += self.value_path.watched(self)
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
        """(W [heads, head_dim, d_in], b [heads, head_dim]) of one KB layer's slot.

        For keys the rows are centred by the LayerNorm mean row, so W e + b is the LayerNorm numerator.
        """
        c = self.config
        lin = self.key_proj if which == "key" else self.value_proj
        s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
        w, b = lin.weight[s], lin.bias[s]
        if which == "key":
            w = w - lin.weight.mean(0, keepdim=True)
            b = b - lin.bias.mean()
        else:  # widened over the value path's extra columns
            if not self.value_path.bound(self):
                raise AdapterError(f"{c.value_source} adapter not bound to its base model (attach() or bind(model) first)")
            w = self.value_path.value_weights(self, layer, w)
        return w.reshape(c.num_heads, c.head_dim, -1), b.reshape(c.num_heads, c.head_dim)

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
        if self.trained_relations:
            tmp_r = path / f".{RELATIONS_NAME}.tmp"
            tmp_r.write_text("".join(r + "\n" for r in sorted(self.trained_relations)), encoding="utf-8")
            tmp_r.replace(path / RELATIONS_NAME)
        if self.relation_pairs:
            write_relation_pairs(path / PAIRS_NAME, self.relation_pairs)
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
            config = AdapterConfig(**legacy_fields(raw, cfg_file))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{cfg_file}: not a valid adapter config ({e})") from e
        if config.format_version != FORMAT_VERSION:
            raise AdapterError(f"{cfg_file}: format_version {config.format_version}, this atlaskv reads {FORMAT_VERSION}")
        _check_config_values(config, cfg_file)
        expected_params = 2 * (config.encoder_dim + 1) * config.out_dim + len(config.kb_layers) * (
            config.hidden_size + config.q_bias + config.encoder_dim + 1) * config.num_heads * config.head_dim \
            + (config.hidden_size ** 2 + len(config.kb_layers)) * config.copy_values
        if not 0 < expected_params < MAX_PARAMS:
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
        rel_file = path / RELATIONS_NAME
        if rel_file.is_file() and rel_file.stat().st_size < MAX_CONFIG_BYTES * 16:
            adapter.trained_relations = frozenset(rel_file.read_text("utf-8").splitlines()) - {""}
        if (path / PAIRS_NAME).is_file():
            adapter.relation_pairs = read_relation_pairs(path / PAIRS_NAME)
        return adapter.to(device)


def count_relation_pairs(triples: Iterable) -> Counter[tuple[str, str]]:
    """(r, s) -> how many heads hold both a fact of relation r and one of s; (r, r): the heads holding r."""
    held: dict[str, set[str]] = {}
    for t in triples:
        held.setdefault(t.head, set()).add(t.relation)
    out: Counter[tuple[str, str]] = Counter()
    for rels in held.values():
        out.update((r, s) for r in rels for s in rels)
    return out


def write_relation_pairs(path: Path, pairs: Counter[tuple[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{r}\t{s}\t{n}\n" for (r, s), n in sorted(pairs.items()) if n > 0), encoding="utf-8")
    tmp.replace(path)


def read_relation_pairs(path: Path) -> Counter[tuple[str, str]]:
    if path.stat().st_size > MAX_CONFIG_BYTES * 16:
        raise AdapterError(f"{path}: {path.stat().st_size:,} bytes is not a relation-pair table")
    out: Counter[tuple[str, str]] = Counter()
    for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].isdigit():
            raise AdapterError(f"{path}:{i}: expected 'relation<TAB>other<TAB>heads', got {line[:80]!r}")
        out[(parts[0], parts[1])] = int(parts[2])
    return out
