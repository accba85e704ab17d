"""Continuous batching: answers that started apart decode together, one token per step.

    decoder.start_many(requests)  prefill a few answers in one left-padded forward, each over its own KB
                                  snapshot with its own HiKVP selection; their cited facts and first tokens
                                  (an answer the refusal rule refuses ends here); start(question, kb): one
    decoder.join(seq)             into the running batch (its left-padded text cache)
    decoder.step()                one more token for every running answer: one batched forward over the
                                  text cache (the KB layers read each row's own KB: KBRows), then each
                                  answer's own logits processors and choice
An answer leaves the batch when it ends and a new one joins at the next step, without waiting for the others
(the iteration-level scheduling of Orca / vLLM). On a CPU a decode step is bound by reading the weights, so 16
rows cost about 2.1x one row (docs/serving.md). A greedy answer is the one AtlasKV.ask gives alone: the same
processors, and padding that the masks take out; not bit-identical arithmetic (other matrix shapes), so the
tokens are checked, not assumed (tests/test_batching.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from atlaskv.defaults import LACKING_RATIO, MAX_NEW_TOKENS, TOP_CITATIONS, VALUE_DECODING
from atlaskv.kb.store import KnowledgeBase
from atlaskv.kb.view import KBView
from atlaskv.model.decoding import may_open_value, spoken
from atlaskv.model.kb_inputs import KBInputs, KBRows, merged, rows_from, use_kb
from atlaskv.model.pruning import PruneConfig
from atlaskv.model.refusal import must_name, names_value, verdict


@dataclass
class Running:
    """One answer in the batch: its prompt and tokens so far, its KB and processors, its cited facts."""
    question: str | Sequence[dict]
    kb_in: KBInputs
    processors: list
    warpers: list                      # sampling (temperature, top-p); empty: greedy
    sample: bool
    tokens: list[int]                  # prompt + generated
    prompt_len: int
    max_new_tokens: int
    answer: object                     # the Answer: citations from the prefill, text once done
    on_token: Callable[[int], None] | None = None
    mask: torch.Tensor | None = None   # [1, prompt_len]: 0 on its left padding (prefilled with longer prompts)
    cache: object = None               # its own text cache, (keys, values) per layer, until it joins the batch
    done: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)
    # refused unless the answer names this value (the refusal rule's "if_unnamed" verdict, model/refusal.py):
    # its tokens are held back from on_token until it does, so a refused answer streams nothing
    must_name: str | None = None
    held: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class Request:
    """What one answer asks: the question (or chat), the KB snapshot, and how to decode."""
    question: str | Sequence[dict]
    kb: KnowledgeBase | KBView
    max_new_tokens: int = MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    value_decoding: bool = VALUE_DECODING
    refuse_below: float = 0.0
    lacking_ratio: float = LACKING_RATIO
    on_token: Callable[[int], None] | None = None
    max_prompt_tokens: int | None = None


class BatchDecoder:
    """The running answers of one AtlasKV, decoded together. Not thread-safe: one scheduler thread drives it."""

    def __init__(self, model, *, top_citations: int = TOP_CITATIONS, prune_config: PruneConfig | None = None):
        self.model, self.top_citations, self.prune_config = model, top_citations, prune_config
        self.rows: list[Running] = []
        self.cache = None          # DynamicCache over the rows, left-padded
        self.mask: torch.Tensor | None = None  # [B, S] 1 where a row has a real token
        self._kb_rows: KBRows | None = None    # the rows' KBs, kept while the batch is the same (it caches stacks)

    # ------------------------------------------------------------ answers in
    def start(self, question: str | Sequence[dict], kb: KnowledgeBase | KBView, **options) -> Running:
        """Prefill one answer alone (start_many's options); join() puts it in the batch."""
        seq = self.start_many([Request(question, kb, **options)])[0]
        if isinstance(seq, BaseException):
            raise seq
        return seq

    @torch.no_grad()
    def start_many(self, requests: list["Request"]) -> list["Running | BaseException"]:
        """Prefill several answers in one forward (left-padded; each row reads its own KB and keeps its own
        HiKVP leaves: KBRows) and choose their first tokens; join() puts each in the batch. The refusal rule
        (refuse_below > 0) reads each prefill's citations: a refused answer is done here, with no token out;
        one whose value's support is low decodes with its tokens held back until it names the value, and is
        refused if it ends without naming it (model/refusal.py verdict).
        A request that cannot start (a prompt over its max_prompt_tokens: PromptTooLong) gets its error in
        its place of the result; the others go on."""
        from transformers import DynamicCache

        m = self.model
        out: list[Running | BaseException] = []
        rows, ids_list = [], []
        for r in requests:
            try:
                ids = m.chat_ids(r.question)
                if r.max_prompt_tokens is not None and ids.shape[1] > r.max_prompt_tokens:
                    raise PromptTooLong(ids.shape[1], r.max_prompt_tokens)
                kb_in = m.kb_inputs(r.kb, record=True, prune_config=self.prune_config)
            except Exception as e:  # this request only
                out.append(e)
                continue
            out.append(None)
            rows.append((len(out) - 1, r, kb_in))
            ids_list.append(ids[0])
        if not rows:
            return out
        T = max(len(i) for i in ids_list)
        pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else m.tokenizer.eos_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long, device=m.device)
        mask = torch.zeros((len(rows), T), dtype=torch.long, device=m.device)
        for b, i in enumerate(ids_list):
            ids[b, T - len(i):], mask[b, T - len(i):] = i, 1
        padded = not bool(mask.all())
        asking = [(r, kb_in) for _, r, kb_in in rows if m.needs_question(kb_in) and kb_in.question_emb is None]
        if asking:  # one encoder call for the rows' questions
            embs = m.question_embeddings([r.question for r, _ in asking])
            for i, (_, kb_in) in enumerate(asking):
                kb_in.question_emb = embs[i:i + 1]
        seqs = []
        for b, (_, r, kb_in) in enumerate(rows):
            row_mask = mask[b:b + 1] if padded else None
            kb_in.token_mask = row_mask  # routing and citations read the real prompt tokens only
            _, processors = m.prepare(r.question, kb_in, r.value_decoding, prompt_ids=ids[b:b + 1],
                                      prompt_mask=row_mask)
            seqs.append(Running(r.question, kb_in, processors, _warpers(r.do_sample, r.temperature, r.top_p),
                                r.do_sample, ids[b].tolist(), T, r.max_new_tokens, None, r.on_token,
                                mask=mask[b:b + 1]))
        row_kbs = [kb_in for _, _, kb_in in rows]
        # rows over one snapshot (a serving group) run the KB layers once for the batch, then split
        batch_kb = merged(row_kbs, mask if padded else None)
        kb = row_kbs[0] if len(rows) == 1 else batch_kb or KBRows(row_kbs)
        position_ids = (mask.cumsum(1) - 1).clamp_min(0) if padded else None
        cache = DynamicCache()
        with use_kb(kb):
            res = m.model(input_ids=ids, attention_mask=mask if padded else None, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        if batch_kb is not None:
            rows_from(batch_kb, row_kbs)
        cache = res.past_key_values
        for b, ((slot, r, kb_in), seq) in enumerate(zip(rows, seqs)):
            seq.answer = m.answer(r.question, r.kb, kb_in, "", self.top_citations)
            seq.cache = [(l.keys[b:b + 1], l.values[b:b + 1]) for l in cache.layers]
            out[slot] = seq
            seq.answer.lacking_ratio = r.lacking_ratio
            lacking = seq.answer.lacking.ratio if seq.answer.lacking is not None else None
            v = verdict(seq.answer.question, seq.answer.citations, r.refuse_below, lacking, r.lacking_ratio)
            if v == "refuse":
                self._finish(seq, refuse=True)
            else:
                seq.must_name = must_name(seq.answer.question, seq.answer.citations) if v == "if_unnamed" else None
                self._take(seq, res.logits[b:b + 1, -1, :])
        return out

    def join(self, seq: Running) -> None:
        """Put a started answer in the batch (left-padding whichever side is shorter)."""
        if seq.done:
            return
        new, seq.cache = seq.cache, None
        row_mask = seq.mask
        self._kb_rows = None  # the batch changes: the KB layers' stacks are rebuilt at the next step
        n = row_mask.shape[1]
        if self.cache is None:
            self.rows, self.cache, self.mask = [seq], _cache_of(new), row_mask
            return
        width = max(self.cache.get_seq_length(), n)
        layers = []
        for old_l, (k, v) in zip(self.cache.layers, new):
            layers.append((torch.cat([_left_pad(old_l.keys, width), _left_pad(k, width)]),
                           torch.cat([_left_pad(old_l.values, width), _left_pad(v, width)])))
        self.cache = _cache_of(layers)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(row_mask, width)])
        self.rows.append(seq)

    # ------------------------------------------------------------ one step for all
    @torch.no_grad()
    def step(self) -> list[Running]:
        """One token for every running answer; returns those that ended (they have left the batch)."""
        if not self.rows:
            return []
        dev = self.model.device
        last = torch.tensor([[r.tokens[-1]] for r in self.rows], device=dev)
        S = self.cache.get_seq_length()
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=dev)], 1)
        positions = self.mask.sum(1, keepdim=True) - 1
        # a lone answer runs without a mask, as generate() does when nothing is padded
        mask = None if bool(self.mask.all()) else self.mask
        if len(self.rows) == 1:
            kb = self.rows[0].kb_in
        else:
            if self._kb_rows is None:  # a join or a drop changed the batch
                self._kb_rows = KBRows([r.kb_in for r in self.rows])
            kb = self._kb_rows
        with use_kb(kb):
            out = self.model.model(input_ids=last, attention_mask=mask, position_ids=positions,
                                   past_key_values=self.cache, cache_position=torch.tensor([S], device=dev), use_cache=True,
                                   logits_to_keep=1)
        self.cache = out.past_key_values
        for b, seq in enumerate(self.rows):
            self._take(seq, out.logits[b:b + 1, -1, :])
        ended = [r for r in self.rows if r.done]
        if ended:
            self._drop([i for i, r in enumerate(self.rows) if not r.done])
        return ended

    def _drop(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self._kb_rows = None
        if not self.rows:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[idx]
        start = int((self.mask.sum(0) > 0).long().argmax())  # columns no row uses any more: cut
        self.mask = self.mask[:, start:]
        self.cache = _cache_of([(l.keys[idx, :, start:], l.values[idx, :, start:]) for l in self.cache.layers])

    def _take(self, seq: Running, logits: torch.Tensor) -> None:
        """Choose the next token of `seq` from its last logits [1, V], as generate() would."""
        scores = logits.to(dtype=torch.float32, copy=True)
        ids = torch.tensor([seq.tokens], device=scores.device)
        for p in seq.processors:
            scores = p(ids, scores)
        if seq.sample:
            for w in seq.warpers:
                scores = w(ids, scores)
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=seq.generator)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        seq.tokens.append(token)
        if seq.must_name is not None:  # held back until the answer names the value
            seq.held.append(token)
            if names_value(self.model.tokenizer.decode(seq.generated, skip_special_tokens=True), seq.must_name):
                seq.must_name, held, seq.held = None, seq.held, []
                self._stream(seq, spoken(seq.processors, 0, held))
        elif may_open_value(seq.processors, 0, seq.generated):
            seq.held.append(token)  # an opening article (and word): left out if a cited value follows (decoding.spoken)
        else:
            held, seq.held = seq.held, []
            self._stream(seq, spoken(seq.processors, 0, held + [token]) if held else [token])
        if token in self.model.stop_ids or len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq)

    @staticmethod
    def _stream(seq: Running, tokens: list[int]) -> None:
        for t in tokens if seq.on_token is not None else ():
            seq.on_token(t)

    def _finish(self, seq: Running, refuse: bool = False) -> Running:
        """End the answer: its text, or REFUSAL when the rule refused it at the prefill (`refuse`) or it ended
        without naming the value it had to (must_name: the stream's verdict, so what was streamed stands)."""
        seq.done = True
        seq.mask = None
        if seq.held and seq.must_name is None:
            self._stream(seq, seq.held)  # an opening article (and word) that no value followed
        text = self.model.tokenizer.decode(spoken(seq.processors, 0, seq.generated), skip_special_tokens=True).strip()
        seq.answer.text = text
        if refuse or seq.must_name is not None:
            seq.answer = seq.answer.refusal()
        seq.processors, seq.cache, seq.held = [], None, []  # what they hold is not needed any more
        return seq


class PromptTooLong(ValueError):
    def __init__(self, n: int, limit: int):
        super().__init__(f"prompt is {n} tokens, at most {limit}")
        self.n, self.limit = n, limit


def _warpers(do_sample: bool, temperature: float, top_p: float) -> list:
    if not do_sample:
        return []
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (-2 for cache tensors [B, H, S, D], -1 for masks [B, S])."""
    axis = -1 if t.dim() == 2 else -2
    n = t.shape[axis]
    if n == width:
        return t
    shape = list(t.shape)
    shape[axis] = width - n
    return torch.cat([t.new_zeros(shape), t], axis)


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)
