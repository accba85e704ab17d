"""AtlasKV: a frozen base LLM + a KBAdapter, reading a KnowledgeBase through its attention.

    question -> chat prompt (chat.py) -> model.generate with the KB attached (kb_inputs: the KB's KBView as
    flat tensors or a HiKVP tree) -> answer text + the triples with the most KB attention (citations)
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from atlaskv.defaults import LACKING_RATIO, MAX_NEW_TOKENS, REFUSAL, REFUSE_BELOW, TOP_CITATIONS, VALUE_DECODING
from atlaskv.kb.encoder import DEFAULT_ENCODER
from atlaskv.kb.store import KnowledgeBase
from atlaskv.kb.triples import Triple
from atlaskv.kb.view import KBView
from atlaskv.model.adapter import AdapterError, KBAdapter
from atlaskv.model.attention import attach
from atlaskv.model.chat import chat_text, messages_text, stop_token_ids
from atlaskv.model.decoding import SpokenStreamer, spoken, value_processors
from atlaskv.model.kb_inputs import KBInputs, use_kb
from atlaskv.model.llm import DEFAULT_LLM, canonical_name, load_base_model
from atlaskv.model.probes import Lacking, lacking_fact
from atlaskv.model.pruning import PruneConfig, PrunedKB
from atlaskv.model.refusal import names_head, refuses, support_of  # noqa: F401  (the public names)
from atlaskv.model.values import value_rows


def default_adapter_dir() -> Path:
    return Path(str(resources.files("atlaskv"))) / "adapters" / "default"


def adapter_base_model(path: str | Path) -> str:
    """The base LLM an adapter folder was trained on (a PACKAGED name or a local folder), from its config."""
    import json

    try:
        name = json.loads((Path(path) / "adapter_config.json").read_text("utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        name = None  # KBAdapter.from_pretrained reports a broken config properly
    return name or DEFAULT_LLM


def asked_text(question: str | Sequence[dict]) -> str:
    """The question asked: the text itself, or a chat's last user message."""
    return question if isinstance(question, str) else [m["content"] for m in question if m["role"] == "user"][-1]


@dataclass
class FlatKB:
    """A view loaded for flat attention: its live rows (positions in the view) as tensors."""
    positions: np.ndarray
    keys: torch.Tensor
    values: torch.Tensor
    inv_std: torch.Tensor


@dataclass
class Answer:
    text: str
    citations: list[tuple[Triple, float]] = field(default_factory=list)
    kb_size: int = 0
    kb_attention_mass: float = 0.0  # share of the prompt's attention (KB layers, heads, tokens) on the KB
    pruned: bool = False            # answered through HiKVP (only the kept leaves were read)
    refused: bool = False           # replaced by REFUSAL: no fact stood out (or_refusal)
    question: str = ""              # the (last user) question asked, for the refusal rule
    lacking: Lacking | None = None  # the fact the KB lacks about the answer's entity that draws the question most
    lacking_ratio: float = LACKING_RATIO  # the refusal rule's threshold on lacking.ratio (or_refusal; 0: never)

    @property
    def support(self) -> float:
        """How far the most-cited value stands out (support_of)."""
        return support_of(self.citations)

    @property
    def missing(self) -> tuple[str, str] | None:
        """(entity, relation) of the fact the question asks for that the KB lacks, when that is why the rule
        refuses (probes.py): ("Linda Ronstadt", "gender") when only her nationality is stored."""
        lk = self.lacking
        if lk is None or lk.relation is None or lk.fact is None or not 0 < self.lacking_ratio <= lk.ratio:
            return None
        return lk.fact[0], lk.relation

    def or_refusal(self, min_support: float = REFUSE_BELOW, lacking_ratio: float | None = None) -> "Answer":
        """This answer, or REFUSAL (citations kept) when the most-cited fact does not back it: it is about an
        entity the question does not name, or its value does not stand out and the answer does not name it,
        or a fact the KB lacks about that entity reads more like the question (`lacking`; `refuses`;
        calibration in defaults.py). `lacking_ratio`: that check's threshold (None: this answer's, by default
        LACKING_RATIO; 0: the check is off)."""
        ans = self if lacking_ratio is None else replace(self, lacking_ratio=lacking_ratio)
        ratio = ans.lacking.ratio if ans.lacking is not None else None
        if not refuses(ans.question, ans.citations, min_support, answer=ans.text, lacking=ratio,
                       lacking_ratio=ans.lacking_ratio):
            return ans
        return ans.refusal()

    def refusal(self) -> "Answer":
        """REFUSAL in this answer's place, its citations kept."""
        return Answer(REFUSAL, self.citations, self.kb_size, self.kb_attention_mass, self.pruned, refused=True,
                      question=self.question, lacking=self.lacking, lacking_ratio=self.lacking_ratio)


class AtlasKV:
    def __init__(self, model, tokenizer, adapter: KBAdapter):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.model.requires_grad_(False)
        attach(model, adapter)
        self._kb_cache: OrderedDict = OrderedDict()
        self._stop_ids = stop_token_ids(tokenizer, model)  # EOS and the chat format's end of turn

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, adapter: str | Path | None = None, base_model: str | None = None,
                        device: str = "cpu", dtype: str = "float32") -> "AtlasKV":
        """The base LLM + a trained adapter (default: the one shipped with atlaskv for SmolLM2). The base
        model is the one named in the adapter's config (`base_model` overrides it)."""
        path = Path(adapter) if adapter else default_adapter_dir()
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"no trained adapter at {path}" + (
                " (this atlaskv ships none yet: train one with `atlaskv train`, or use "
                "AtlasKV.from_base_model() for an untrained adapter)" if adapter is None else ""))
        model, tok = load_base_model(base_model or adapter_base_model(path), dtype=dtype, device=device)
        return cls(model, tok, KBAdapter.from_pretrained(path, model=model, device=device))

    @classmethod
    def from_base_model(cls, base_model: str | None = None, encoder: str = DEFAULT_ENCODER, encoder_dim: int = 384,
                        device: str = "cpu", dtype: str = "float32", **adapter_kw) -> "AtlasKV":
        """A fresh adapter (KB query heads copied from q_proj) on the base LLM: the start of training."""
        model, tok = load_base_model(base_model, dtype=dtype, device=device)
        adapter = KBAdapter.for_model(model, encoder, encoder_dim, base_model=canonical_name(base_model),
                                      **adapter_kw)
        return cls(model, tok, adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ KB
    def kb_inputs(self, kb: KnowledgeBase | KBView, *, record: bool = False, prune: bool | PruneConfig | None = None,
                  prune_config: PruneConfig | None = None, scale_factor: float | None = None,
                  question_emb: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> KBInputs:
        """The KB as one forward / generate call reads it. Flat: every live row's base embeddings as tensors.
        Pruned (HiKVP; the default whenever the KB has a tree): the tree plus row-addressable embeddings, of
        which each KB layer reads only the leaves it keeps. What is loaded is cached for one KB at a time (a
        KB directory: per version). `prune` may be a PruneConfig (the same as prune=True, prune_config=it);
        `scale_factor` overrides the adapter's length correction."""
        if isinstance(prune, PruneConfig):
            prune, prune_config = True, prune
        view = self._view(kb)
        if prune is None:
            prune = view.tree is not None
        loaded = self._loaded(view, bool(prune))
        scale = scale_factor if scale_factor is not None else self.adapter.config.kb_scale_factor
        common = dict(scale_factor=scale, record=record, question_emb=question_emb, token_mask=token_mask)
        if prune:
            pkb = copy.copy(loaded)  # shares the tree and arrays; a per-call search config
            pkb.config = prune_config or PruneConfig()
            return KBInputs(pruned=pkb, view=view, **common)
        return KBInputs(loaded.keys, loaded.values, key_inv_std=loaded.inv_std, view=view, flat_rows=loaded.positions,
                        **common)

    def cite(self, kb: KnowledgeBase | KBView, kb_in: KBInputs, positions: torch.Tensor) -> list[Triple]:
        """The triples at these positions of `kb_in`'s attention (flat: live rows in order; pruned: rows)."""
        view = self._view(kb)
        rows = positions.cpu().numpy()
        if kb_in.pruned is None:
            rows = self._loaded(view, False).positions[rows]
        return view.triples(rows)

    def _view(self, kb: KnowledgeBase | KBView) -> KBView:
        if isinstance(kb, KBView):
            return self._entry(kb.cache_key or ("view", id(kb)), lambda: kb)["view"]
        if kb.encoder_name != self.adapter.config.encoder:
            raise AdapterError(f"KB {kb.path} was built with encoder {kb.encoder_name!r}; the adapter expects "
                               f"{self.adapter.config.encoder!r} (rebuild with --encoder {self.adapter.config.encoder})")
        return self._entry((str(kb.path), kb.version), kb.view)["view"]

    def _entry(self, key: tuple, make_view) -> dict:
        """What is loaded of one KB: {"view", True: pruned, False: flat}. One version of a KB directory is
        kept (an update makes a new one), and the two most recent in-memory views (an evaluation asks a KB
        and the same KB without some facts in turn). A cached view stays alive, so its id is not reused."""
        cache = self._kb_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        same_kind = [k for k in cache if (k[0] == "view") == (key[0] == "view")]
        keep = 1 if key[0] == "view" else 0
        for other in same_kind[:max(0, len(same_kind) - keep)]:
            del cache[other]
        cache[key] = {"view": make_view()}
        return cache[key]

    def _loaded(self, view: KBView, prune: bool):
        entry = self._entry(view.cache_key or ("view", id(view)), lambda: view)
        if prune not in entry:
            entry[prune] = self._load_pruned(view) if prune else self._load_flat(view)
        return entry[prune]

    def _load_flat(self, view: KBView) -> "FlatKB":
        positions = view.live_positions()
        keys = torch.from_numpy(view.keys.take(positions)).to(self.device)
        values = torch.from_numpy(value_rows(self.adapter, self.model, self.tokenizer, view).take(positions))
        with torch.no_grad():  # the key LayerNorm scale per entry: the same for every call, computed once
            inv_std = self.adapter.key_inv_std(keys)
        return FlatKB(positions, keys, values.to(self.device), inv_std)

    def _load_pruned(self, view: KBView) -> PrunedKB:
        if view.tree is None:
            where = view.cache_key[0] if view.cache_key else "this KB view"
            raise AdapterError(f"KB {where} has no HiKVP index: build one with `atlaskv kb index {where}` "
                               "or ask with --no-prune")
        values = value_rows(self.adapter, self.model, self.tokenizer, view)
        return PrunedKB(view.tree, view.keys, values, live=view.live, rows=view.rows, size=view.size,
                        device=self.device)

    # ------------------------------------------------------------------ generation
    def question_embedding(self, question: str | Sequence[dict]) -> torch.Tensor:
        """[1, d_in]: the sentence encoder's view of the (last user) question, for question_input adapters."""
        return self.question_embeddings([question])

    def question_embeddings(self, questions: Sequence[str | Sequence[dict]]) -> torch.Tensor:
        """[B, d_in]: question_embedding of several questions in one encoder call (a batched prefill)."""
        texts = [q if isinstance(q, str) else [m["content"] for m in q if m["role"] == "user"][-1] for q in questions]
        return torch.from_numpy(self.encoder.encode(texts)).to(self.device)

    @property
    def encoder(self):
        """The adapter's sentence encoder (loaded once per process): question embeddings, lacking keys."""
        from atlaskv.kb.encoder import load_encoder

        return load_encoder(self.adapter.config.encoder)

    def needs_question(self, kb_in: KBInputs | None) -> bool:
        """Whether this call reads the question's sentence embedding (the adapter, or the HiKVP route)."""
        return kb_in is not None and (self.adapter.config.question_input or (
            kb_in.pruned is not None and kb_in.pruned.config.route != "kbq"))

    def chat_ids(self, question: str | Sequence[dict]) -> torch.Tensor:
        """Prompt ids as in training: ChatML without SmolLM2's default system prompt; other families in
        their tokenizer's chat format (Gemma 3: <bos><start_of_turn>user ... <start_of_turn>model)."""
        text = chat_text(self.tokenizer, question) if isinstance(question, str) \
            else messages_text(self.tokenizer, question)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def generate(self, question: str | Sequence[dict], kb: KnowledgeBase | KBView | KBInputs | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, do_sample: bool = False, streamer=None,
                 value_decoding: bool = VALUE_DECODING, **gen_kw) -> str:
        """The answer text. `value_decoding`: a started KB value is finished as stored and ends the answer
        (decoding.py); off, the model decodes freely with the copy votes only."""
        kb_in = self.kb_inputs(kb) if isinstance(kb, (KnowledgeBase, KBView)) else kb
        ids, processors = self.prepare(question, kb_in, value_decoding, gen_kw.pop("logits_processor", None))
        from transformers import TextStreamer

        if isinstance(streamer, TextStreamer):  # text, as returned: an opening article waits (decoding.spoken)
            streamer = SpokenStreamer(streamer, processors)
        with use_kb(kb_in):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, streamer=streamer, logits_processor=processors,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **{"eos_token_id": self._stop_ids, **gen_kw})
        answer = spoken(processors, 0, out[0, ids.shape[1]:].tolist())
        return self.tokenizer.decode(answer, skip_special_tokens=True).strip()

    def prepare(self, question: str | Sequence[dict], kb_in: KBInputs | None, value_decoding: bool = VALUE_DECODING,
                logits_processor=None, prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None):
        """(prompt ids [1, T], logits processors) of one answer, with the question's embedding set on `kb_in`
        where the adapter or the HiKVP route reads it: what generate() and the batching scheduler share.
        prompt_ids / prompt_mask: the prompt as a batched prefill padded it (model/batching.py)."""
        from transformers import LogitsProcessorList

        ids = self.chat_ids(question) if prompt_ids is None else prompt_ids
        if self.needs_question(kb_in) and kb_in.question_emb is None:
            kb_in.question_emb = self.question_embedding(question)
        processors = LogitsProcessorList(logits_processor or [])
        processors.extend(value_processors(kb_in, self.tokenizer, ids, prompt_mask, self._stop_ids, value_decoding,
                                           questions=[asked_text(question)]))
        return ids, processors

    @property
    def stop_ids(self) -> list[int]:
        """EOS and the chat format's end of turn: generation ends at any of them."""
        return list(self._stop_ids)

    def stream(self, question: str | Sequence[dict], kb: KnowledgeBase | KBView | None = None, **kw) -> Iterator[str]:
        """Yield the answer text piece by piece as it is generated."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kb_in = self.kb_inputs(kb) if isinstance(kb, (KnowledgeBase, KBView)) else kb
        errors: list[BaseException] = []

        def run():
            try:
                self.generate(question, kb_in, streamer=streamer, **kw)
            except BaseException as e:  # surfaced to the caller below
                errors.append(e)
                streamer.end()

        t = Thread(target=run, daemon=True)
        t.start()
        yield from streamer
        t.join()
        if errors:
            raise errors[0]

    @torch.no_grad()
    def ask(self, question: str, kb: KnowledgeBase | KBView, max_new_tokens: int = MAX_NEW_TOKENS, top_citations: int = TOP_CITATIONS,
            prune: bool | None = None, prune_config: PruneConfig | None = None, **gen_kw) -> Answer:
        """Answer from the KB, citing the triples with the most KB attention (summed over KB layers,
        heads and prompt tokens) during the prefill. `prune`: HiKVP (default when the KB has an index)."""
        kb_in = self.kb_inputs(kb, record=True, prune=prune, prune_config=prune_config)
        text = self.generate(question, kb_in, max_new_tokens=max_new_tokens, **gen_kw)
        return self.answer(question, kb, kb_in, text, top_citations)

    def answer(self, question: str | Sequence[dict], kb: KnowledgeBase | KBView, kb_in: KBInputs, text: str,
               top_citations: int = TOP_CITATIONS) -> Answer:
        """The Answer of `text`, generated over `kb_in` (record=True): its citations from the prefill's KB
        attention. The prefill alone decides them, so a caller may build the Answer before decoding."""
        pruned = kb_in.pruned is not None
        asked = asked_text(question)
        if not kb_in.attention or kb_in.size == 0:
            return Answer(text, [], kb_in.size, 0.0, pruned, question=asked)
        (positions, weights), = kb_in.summed_attention(kb_in.token_mask)
        n_heads = self.adapter.config.num_heads
        n_tokens = next(iter(kb_in.attention.values())).shape[1]
        total = float(weights.sum())
        mass = total / (len(kb_in.attention) * n_heads * n_tokens)
        k = min(top_citations, len(positions))
        cites = list(zip(self.cite(kb, kb_in, positions[:k]), (float(w) / total for w in weights[:k])))
        # a chat: the last question's own tokens (its one-turn prompt's length), not the turns before it
        last = None if isinstance(question, str) else self.chat_ids(asked).shape[1]
        lacking = lacking_fact(self.adapter, self.encoder, kb_in, asked, last_tokens=last) \
            if kb_in.recorded.readers else None
        return Answer(text, cites, kb_in.size, mass, pruned, question=asked, lacking=lacking)
