"""AtlasKV: a frozen base LLM + a KBAdapter, reading a KnowledgeBase through its attention."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .adapter import AdapterError, KBAdapter
from .attention import KBInputs, attach, use_kb
from .encoder import DEFAULT_ENCODER
from .kg import Triple
from .llm import DEFAULT_LLM, load_base_model
from .store import KnowledgeBase


def default_adapter_dir() -> Path:
    return Path(str(resources.files("atlaskv"))) / "adapters" / "default"


@dataclass
class Answer:
    text: str
    citations: list[tuple[Triple, float]] = field(default_factory=list)
    kb_size: int = 0
    kb_attention_mass: float = 0.0  # share of the prompt's attention (KB layers, heads, tokens) on the KB


class AtlasKV:
    def __init__(self, model, tokenizer, adapter: KBAdapter):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.model.requires_grad_(False)
        attach(model, adapter)
        self._kb_cache: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, adapter: str | Path | None = None, base_model: str | None = None,
                        device: str = "cpu", dtype: str = "float32") -> "AtlasKV":
        """The base LLM + a trained adapter (default: the one shipped with atlaskv for SmolLM2)."""
        path = Path(adapter) if adapter else default_adapter_dir()
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"no trained adapter at {path}" + (
                " (this atlaskv ships none yet: train one with `atlaskv train`, or use "
                "AtlasKV.from_base_model() for an untrained adapter)" if adapter is None else ""))
        model, tok = load_base_model(base_model, dtype=dtype, device=device)
        return cls(model, tok, KBAdapter.from_pretrained(path, model=model, device=device))

    @classmethod
    def from_base_model(cls, base_model: str | None = None, encoder: str = DEFAULT_ENCODER, encoder_dim: int = 384,
                        device: str = "cpu", dtype: str = "float32", **adapter_kw) -> "AtlasKV":
        """A fresh adapter (KB query heads copied from q_proj) on the base LLM: the start of training."""
        model, tok = load_base_model(base_model, dtype=dtype, device=device)
        adapter = KBAdapter.for_model(model, encoder, encoder_dim, base_model=base_model or DEFAULT_LLM,
                                      **adapter_kw)
        return cls(model, tok, adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ KB
    def kb_inputs(self, kb: KnowledgeBase, scale_factor: float | None = None, record: bool = False) -> KBInputs:
        """The KB's live base embeddings as tensors on the model's device (cached per KB version)."""
        if kb.encoder_name != self.adapter.config.encoder:
            raise AdapterError(f"KB {kb.path} was built with encoder {kb.encoder_name!r}; the adapter expects "
                               f"{self.adapter.config.encoder!r} (rebuild with --encoder {self.adapter.config.encoder})")
        key = (str(kb.path), kb.version)
        if key not in self._kb_cache:
            ids, keys, values = kb.embeddings()
            records = kb.records()  # live entries in id order, as the embeddings: row i cites triple i
            assert np.array_equal(records.column("id").to_numpy(), ids)
            triples = list(zip(*(records.column(c).to_pylist() for c in ("head", "relation", "tail"))))
            self._kb_cache = {key: (triples, torch.from_numpy(np.asarray(keys, np.float32)).to(self.device),
                                    torch.from_numpy(np.asarray(values, np.float32)).to(self.device))}
        _, keys, values = self._kb_cache[key]
        scale = scale_factor if scale_factor is not None else self.adapter.config.kb_scale_factor
        return KBInputs(keys, values, scale_factor=scale, record=record, scale_mode=self.adapter.config.kb_scale_mode)

    # ------------------------------------------------------------------ generation
    def question_embedding(self, question: str | Sequence[dict]) -> torch.Tensor:
        """[1, d_in]: the sentence encoder's view of the (last user) question, for question_input adapters."""
        from .encoder import load_encoder

        text = question if isinstance(question, str) else [m["content"] for m in question if m["role"] == "user"][-1]
        return torch.from_numpy(load_encoder(self.adapter.config.encoder).encode([text])).to(self.device)

    def chat_ids(self, question: str | Sequence[dict]) -> torch.Tensor:
        """Prompt ids as in training: ChatML without SmolLM2's default system prompt."""
        from .train import chat_text

        if isinstance(question, str):
            text = chat_text(self.tokenizer, question)
        else:
            messages = list(question)
            if "<|im_start|>" in (self.tokenizer.chat_template or ""):
                text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                text += "<|im_start|>assistant\n"
            else:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    @torch.no_grad()
    def generate(self, question: str | Sequence[dict], kb: KnowledgeBase | KBInputs | None = None,
                 max_new_tokens: int = 48, do_sample: bool = False, streamer=None, **gen_kw) -> str:
        kb_in = self.kb_inputs(kb) if isinstance(kb, KnowledgeBase) else kb
        ids = self.chat_ids(question)
        if kb_in is not None and self.adapter.config.question_input and kb_in.question_emb is None:
            kb_in.question_emb = self.question_embedding(question)
        with use_kb(kb_in):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, streamer=streamer,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **gen_kw)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def stream(self, question: str | Sequence[dict], kb: KnowledgeBase | None = None, **kw) -> Iterator[str]:
        """Yield the answer text piece by piece as it is generated."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kb_in = self.kb_inputs(kb) if isinstance(kb, KnowledgeBase) else kb
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
    def ask(self, question: str, kb: KnowledgeBase, max_new_tokens: int = 48, top_citations: int = 5,
            **gen_kw) -> Answer:
        """Answer from the KB, citing the triples with the most KB attention (summed over KB layers,
        heads and prompt tokens) during the prefill."""
        kb_in = self.kb_inputs(kb, record=True)
        text = self.generate(question, kb_in, max_new_tokens=max_new_tokens, **gen_kw)
        if not kb_in.attention or kb_in.size == 0:
            return Answer(text, [], kb_in.size, 0.0)
        att = sum(a[0].sum(0) for a in kb_in.attention.values())            # [N]
        n_heads = self.adapter.config.num_heads
        n_tokens = next(iter(kb_in.attention.values())).shape[1]
        mass = float(att.sum()) / (len(kb_in.attention) * n_heads * n_tokens)
        top = torch.topk(att, min(top_citations, kb_in.size))
        triples = self._kb_cache[(str(kb.path), kb.version)][0]
        total = float(att.sum())
        cites = [(Triple(*triples[int(i)]), float(w) / total) for w, i in zip(top.values, top.indices)]
        return Answer(text, cites, kb_in.size, mass)
