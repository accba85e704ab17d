"""Value decoding: the answer names the cited value exactly, once, and then ends.

The KB attention finds the right fact nearly always (its entry is cited first), yet free greedy decoding
garbles the value ("Heather Norton" for Heather Graham), splices it into the restated question ("The
contained location of Volusia Daytona Beach is ..."), repeats it ("United States of America United States
of America ...") or, in a large KB, names a value it made up. This logits processor (transformers' registered
extension point for decoding, so the model stays stock) holds the answer to the facts the prefill cites.
After the prefill it takes, per sample, the values of the most cited entries (those within VALUE_SHARE of
the first one's weight, at most TOP_VALUES), and before every later token applies the first rule that fits:

  stop        a cited value is out in full, not as part of the restated question (the token before it is not
              one it follows in the question: "Stade de France is owned by France" ends at the second):
              the sentence ends, "." then the end of the turn; unless
              the first-cited key (head and relation) has several cited values: then each one not named yet
              follows, joined by "," and "and" ("The genres of X are Drama, Comedy and Thriller.");
  restating   the answer's last two tokens stand side by side in the question (case-blind), its only token opens
              a word pair there ("The" of "the gender of"), or its last token is a name-like word the question
              goes on from ("Jeanne" of "Jeanne Lamon"): inside the first-cited fact's head only the head's
              next token may follow ("Forrest G" -> "ump", not "Forrest Games"); elsewhere the copy votes of
              this step are taken back and nothing is pushed (the head is restated as asked, not with the
              value spliced in, and "The state of Augusta" goes on with "is", not with "Maine");
  finish      (checked before restating once the answer holds the cited head, "Bleach: Fade to Black is
              Bleach" goes on into the value "Bleach: The DiamondDust Rebellion", not into the head again; or
              when the started words of the value do not stand in the question as they are: "East Africa Time
              Zone" goes on to "-US" though the question asks "which time zone")
              the answer ends with a proper prefix of a cited value (a value opening with a word like "The"
              counts from its second token, unless it is the first-cited one): only the next tokens of such
              values may follow, so a started value ends as stored ("Heather" -> "Heather Graham");
  push        no value is out yet: each cited value's first token gets VALUE_PUSH logits times its weight
              (relative to the first-cited), the copy logits' job done with the prefill's citations, which
              stay sharp in large KBs where the decode step's attention spreads.

An answer whose opening article ("The", "A", "An"), with at most one word after it, is followed straight by a
cited value that does not open with a word like "The" is read without them (`spoken`): asked "Robert De Niro was
born where?", where no "the" invites a restatement, SmolLM2 opens with "The" and the push then gives "The
Greenwich Village." (112 of the 200 answers of the dev set in held-out phrasings), now and then "The state Iowa.".
The tokens, and so every rule above and the refusal rule, are unchanged; the text and the stream leave those words
out (a stream holds an opening article, and a word after it, until the next word shows whether a value follows).

While no value is out and none is being finished, a token that would repeat one of the answer's own word
3-grams is ruled out (tokens compare by their words, case-blind): transformers' no_repeat_ngram_size, but over
the answer only, since restating the question is how answers open. Without it, a model that never starts a
value can loop until the budget ends ("... a brief summary of the response in a narrative format: The
response ..."). Under greedy decoding an answer with no repeated 3-gram is unchanged by this rule.

An answer whose top fact the prefill's refusal rule accepts (model/refusal.py, at TRUSTED_SUPPORT) names a value: it may
not open with the model's own "I don't know." (learned in training for facts the KB lacks, it also fires on
phrasings training never used: 9 of the 20 answers that were not exact on the dev set of training facts in
held-out phrasings), nor end its turn before a value is out (TRUSTED_MUST_NAME). From a lower support
(OWN_REFUSAL_BELOW) it may not open with "I don't know." either, but may end without a value: whether the KB lacks
the fact is then the refusal rule's call, which also weighs the facts the entity lacks (model/probes.py).

The settings were picked on the dev sets of training facts (benchmarks/make_dev_set.py, the guards and the push
on its held-out phrasings; docs/results.md), never on the evaluation sets. Off with `value_decoding=False` (AtlasKV.generate / ask, eval grounding
--no-value-decoding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from atlaskv.defaults import OWN_REFUSAL_BELOW, REFUSAL, TOP_CITATIONS, TRUSTED_SUPPORT
from atlaskv.model.kb_inputs import KBInputs
from atlaskv.model.refusal import backing, refuses

# a value that opens with one of these words counts as started from its second token: an answer opening
# "The ..." has not started "The Beatles"
_WEAK_FIRST = {"the", "a", "an", "in", "of", "on", "at", "to", "is", "it", "and", "for", "by", "from", "with"}
TOP_VALUES = 5      # cited entries whose values may steer an answer
VALUE_SHARE = 0.25  # ... each weighing at least this share of the first-cited entry's prefill attention
VALUE_PUSH = 12.0  # logits added to a cited value's first token while no value is out, times its weight
FLAT_RECORD_MAX = 1 << 17  # flat KBs above this size decode freely unless the caller records (ask does)
TRUSTED_MUST_NAME = True   # a trusted answer (the refusal rule accepts its top fact) may not end before a value


@dataclass
class CitedValue:
    text: str
    forms: tuple[list[int], ...]   # its token ids after a space, and at the start of a line
    restated_after: set[int]       # tokens the value follows in the question: after one, it is restated
    weak_first: bool
    listed: bool = False           # one of several values of the first-cited key: all of them are named
    weight: float = 1.0            # its entry's prefill attention over the first-cited entry's


class ValueDecoding(LogitsProcessor):
    def __init__(self, kb: KBInputs, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                 stop_ids: list[int], top: int | None = None, share: float | None = None, push: float | None = None,
                 questions: list[str] | None = None, note_logprob: bool = False):
        self.kb, self.tokenizer, self.stop_ids = kb, tokenizer, list(stop_ids)
        self.note_logprob = note_logprob  # value_logprob, for evaluation only: a softmax per row and step
        self.question_texts = questions  # per sample, for the refusal rule (None: trust is never given)
        # an answer's first token comes bare ("I") or spaced (" I"): SmolLM2 opens with either
        self.refusal_first = _first_tokens(tokenizer, REFUSAL)
        self.articles = {t: word.casefold() for word in ("The", "A", "An") for t in _first_tokens(tokenizer, word)
                         if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1}
        self._texts: dict[int, str] = {}
        self._raws: dict[int, str] = {}
        self.top = TOP_VALUES if top is None else top
        self.share = VALUE_SHARE if share is None else share
        self.push = VALUE_PUSH if push is None else push
        self.prompt_len, self.prompt_mask = prompt_ids.shape[1], prompt_mask
        self.period = tokenizer.convert_tokens_to_ids(".")
        self.comma = tokenizer.convert_tokens_to_ids(",")
        and_ = tokenizer(" and", add_special_tokens=False)["input_ids"]
        self.and_ = and_[0] if len(and_) == 1 else self.comma
        self.questions = [(prompt_ids[b] if prompt_mask is None else prompt_ids[b][prompt_mask[b].bool()]).tolist()
                          for b in range(prompt_ids.shape[0])]
        # word pairs of the question, case-blind: an answer that opens "The budget" restates "the budget currency"
        self.question_words = [[self._word(t) for t in q] for q in self.questions]
        self.pairs = [set(zip(w, w[1:])) for w in self.question_words]
        # name-like words of the question that go on into another word there ("Jeanne" of "Jeanne Lamon"): an
        # answer that ends with one is restating the question's head, whatever the token before it
        self.head_words = [{self._text(q[i]) for i in range(len(q) - 1)
                            if self._text(q[i])[:1].isupper() and any(c.isalnum() for c in self._text(q[i + 1]))}
                           for q in self.questions]
        self.values: list[list[CitedValue]] | None = None
        self.heads: list[tuple[list[int], ...]] = []  # token forms of each sample's first-cited head
        self.trusted: list[bool] = []  # the refusal rule accepts the sample's top fact
        self.no_own_refusal: list[bool] = []  # ... at OWN_REFUSAL_BELOW: the answer may not open with "I don't know."
        # per sample: the model's own log-probability (before these rules) of the top-cited value's first
        # token, its highest over the steps before the answer names that value; None if it never could.
        # A refusal signal (eval grounding --save-answers): how much the value had to be pushed
        self.value_logprob: list[float | None] = []

    # ------------------------------------------------------------------ the cited values (after the prefill)
    def _cited_values(self) -> list[list[CitedValue]]:
        view = self.kb.view
        self.heads = [() for _ in self.questions]
        self.trusted = [False for _ in self.questions]
        self.no_own_refusal = [False for _ in self.questions]
        self.value_logprob = [None for _ in self.questions]
        if view is None or not self.kb.attention:
            return [[] for _ in self.questions]
        out = []
        for b, (rows, w) in enumerate(self.kb.cited_rows(self.prompt_mask)):
            w = w.float().cpu()
            n = max(self.top, TOP_CITATIONS)
            cited = view.triples(rows[:n])
            if self.question_texts is not None:
                citations = list(zip(cited, w[:n].tolist()))
                self.trusted[b] = not refuses(self.question_texts[b], citations, TRUSTED_SUPPORT)
                self.no_own_refusal[b] = not refuses(self.question_texts[b], citations, OWN_REFUSAL_BELOW)
                at = backing(self.question_texts[b], citations)
                if at:  # facts about entities the question does not name, cited above one it does: not its answer
                    cited, w = cited[at:], w[at:]
            keep = [i for i in range(min(self.top, len(cited))) if w[i] >= self.share * w[0] and w[0] > 0]
            triples = [cited[i] for i in keep]
            key = (triples[0].head.casefold(), triples[0].relation) if triples else None
            if triples:
                self.heads[b] = self._value(b, triples[0].head.strip()).forms
            values: dict[str, CitedValue] = {}
            for t, i in zip(triples, keep):
                if t.tail.strip() and t.tail.strip() not in values:
                    values[t.tail.strip()] = self._value(b, t.tail.strip())
                    values[t.tail.strip()].listed = (t.head.casefold(), t.relation) == key
                    values[t.tail.strip()].weight = float(w[i] / w[0])
            if sum(v.listed for v in values.values()) < 2:
                for v in values.values():
                    v.listed = False
            out.append(list(values.values()))
        return out

    def _value(self, b: int, text: str) -> CitedValue:
        spaced = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        bare = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        weak = text.split()[0].casefold() in _WEAK_FIRST
        q = self.questions[b]
        after = {q[i - 1] for f in (spaced, bare) for i in range(1, len(q) - len(f) + 1) if q[i:i + len(f)] == f}
        return CitedValue(text, (spaced, bare), after, weak)

    def _text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token]).strip()
        return text

    def _word(self, token: int) -> str:
        return self._text(token).casefold()

    def _asked(self, b: int, tokens: list[int]) -> bool:
        """These tokens' words stand in the question in a row (case-blind)."""
        words, asked = [self._word(t) for t in tokens], self.question_words[b]
        return any(asked[i:i + len(words)] == words for i in range(len(asked) - len(words) + 1))

    def _restating(self, b: int, answer: list[int]) -> bool:
        """The answer's end copies the question: its last two tokens stand there side by side, or its last
        token is a name-like word the question goes on from."""
        if len(answer) >= 2 and (self._word(answer[-2]), self._word(answer[-1])) in self.pairs[b]:
            return True
        if len(answer) == 1 and self._word(answer[0]) in self.question_words[b][:-1]:
            return True  # an opening word that starts a pair of the question ("The" of "the gender of X")
        return bool(answer) and self._text(answer[-1]) in self.head_words[b]

    def opening_article(self, b: int, answer: list[int]) -> int:
        """How many opening tokens the text leaves out (`spoken`): an article, and at most one word after it,
        when a cited value that does not open with a word like "The" follows straight ("The" + " Greenwich" of
        "Greenwich Village"; "The state Iowa."); 0 otherwise."""
        if len(answer) < 2 or answer[0] not in self.articles or not self.values or not self.values[b]:
            return 0
        firsts = self._value_firsts(b)
        for i in range(1, min(len(answer), 8)):
            if answer[i] in firsts:
                return i
            raw = self._raw(answer[i])
            if not (raw.startswith(" ") if i == 1 else not raw.startswith(" ")) or not raw.strip().isalpha():
                return 0  # not one word after the article
        return 0

    def holds_opening(self, b: int, answer: list[int]) -> bool:
        """The answer so far is an article and at most one word, no value started: a stream holds it back until
        the next token shows whether the text leaves it out."""
        if not answer or answer[0] not in self.articles or not self.values or not self.values[b]:
            return False
        if len(answer) > 1 and (answer[1] in self._value_firsts(b) or len(answer) > 7):
            return False
        raws = [self._raw(t) for t in answer[1:]]
        return all(r.strip().isalpha() and r.startswith(" ") == (i == 0) for i, r in enumerate(raws))

    def _value_firsts(self, b: int) -> set[int]:
        return {v.forms[0][0] for v in self.values[b] if v.forms[0] and not v.weak_first}

    def _raw(self, token: int) -> str:
        """The token's text as decoded, its leading space kept."""
        raw = self._raws.get(token)
        if raw is None:
            raw = self._raws[token] = self.tokenizer.decode([token])
        return raw

    # ------------------------------------------------------------------ the rules
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.values is None:
            self.values = self._cited_values()
        added = self.kb.call.copy_added
        for b in range(scores.shape[0]):
            answer = input_ids[b, self.prompt_len:].tolist()
            if self.note_logprob and self.values[b] and not _said(self.values[b][0], answer):
                self._note_logprob(b, scores[b])
            nxt, done, named, at_end, started = self._state(self.values[b], answer)
            if (self.trusted[b] or self.no_own_refusal[b]) and not done and not answer:
                self._ban(scores, b, self.refusal_first)  # the rule, not the model, says "I don't know."
            if self.trusted[b] and not done and TRUSTED_MUST_NAME:  # the rule accepts the top fact: name a value
                self._ban(scores, b, set(self.stop_ids))
            if done and (at_end or not nxt):  # a value is out: the list goes on, or the sentence ends
                ends = self._list_next(self.values[b], answer, named)
                if ends is None:
                    last = self.tokenizer.decode(answer[-1:]).strip()
                    ends = self.stop_ids if last[-1:] in (".", "!", "?") else [self.period]
                self._only(scores, b, nxt | set(ends))
            elif nxt and (_contains(answer[:-1], self.heads[b]) or not self._asked(b, answer[-started:])):
                # the value, not the question: the head is out already ("... is Bleach" of "Bleach: The
                # DiamondDust Rebellion"), or the value's started words do not stand in the question as they
                # are ("East Africa Time Zone" asked "which time zone")
                self._only(scores, b, nxt)
            elif self._restating(b, answer):
                head_next = _continuations(self.heads[b], answer, self._word)
                if head_next:  # inside the cited head's name: it is restated as stored ("Forrest G" -> "ump")
                    self._only(scores, b, head_next)
                else:
                    if added is not None and added.shape[0] == scores.shape[0]:
                        scores[b] -= added[b].to(scores.dtype)  # restating the question: no copy votes
                    if not done:
                        self._ban(scores, b, _repeats(answer, word=self._word))
            elif nxt:
                self._only(scores, b, nxt)
            else:
                if self.push and not done:  # no value yet: each cited value's first token, by its weight
                    for v in self.values[b]:
                        scores[b, v.forms[0 if answer else 1][0]] += self.push * v.weight
                if not done:
                    self._ban(scores, b, _repeats(answer, word=self._word))
        return scores

    def _note_logprob(self, b: int, scores: torch.Tensor) -> None:
        firsts = sorted({ids[0] for ids in self.values[b][0].forms if ids})
        if not firsts:
            return
        lp = float(torch.log_softmax(scores.float(), -1)[firsts].max())
        if self.value_logprob[b] is None or lp > self.value_logprob[b]:
            self.value_logprob[b] = lp

    def _list_next(self, values: list[CitedValue], answer: list[int], named: set[str]) -> list[int] | None:
        """While values of a listed key are unnamed: "," or " and" after a value, then the first token of one of
        the unnamed values; None once every one is named (or the key has one value)."""
        left = [v for v in values if v.listed and v.text not in named]
        if not left or not any(v.listed and v.text in named for v in values):
            return None
        if answer and answer[-1] in (self.comma, self.and_):
            return [v.forms[0][0] for v in left]
        return [self.comma] if len(left) > 1 else [self.and_]

    def _state(self, values: list[CitedValue], answer: list[int]) -> tuple[set[int], bool, set[str], bool, int]:
        """(the tokens that continue a started value, whether a value is out in full more often than the
        question holds it, the values so named, whether one of them ends the answer, how many tokens of the
        longest started value the answer ends with). Values are taken in the order of their weight where they
        conflict."""
        nxt, done, named, at_end, length = {}, False, set(), 0.0, {}
        for v in values:
            if _said(v, answer):
                done = True
                named.add(v.text)
                if any(answer[-len(ids):] == ids for ids in v.forms):
                    at_end = max(at_end, v.weight)
                continue
            best = (0, None)  # the value's longest started form: "S.S. Robur S" goes on into "iena", it does
            for ids in v.forms:  # not start over at its spaced form's " S"
                for j in range(min(len(ids) - 1, len(answer)), 0, -1):
                    listed = v.listed and len(answer) > j and answer[-j - 1] in (self.comma, self.and_)
                    if j == 1 and v.weak_first and not (listed or v.weight >= 1.0):
                        break  # "The" starts the first-cited "The Beatles", not any cited value
                    if answer[-j:] == ids[:j]:
                        if j > best[0]:
                            best = (j, ids[j])
                        break
            j, token = best
            if token is not None:
                nxt[token] = max(nxt.get(token, 0.0), v.weight)
                length[token] = max(length.get(token, 0), j)
        if at_end:  # a value just ended: a longer one goes on only if it weighs more ("Google" / "Google Keep")
            nxt = {t: w for t, w in nxt.items() if w > at_end}
        return set(nxt), done, named, at_end > 0, max((length[t] for t in nxt), default=0)

    @staticmethod
    def _ban(scores: torch.Tensor, b: int, banned: set[int]) -> None:
        if not banned:
            return
        ban = torch.tensor(sorted(banned), device=scores.device)
        keep = torch.ones_like(scores[b], dtype=torch.bool)
        keep[ban] = False
        if torch.isfinite(scores[b][keep]).any():  # never leave no token at all
            scores[b, ban] = float("-inf")

    @staticmethod
    def _only(scores: torch.Tensor, b: int, allowed) -> None:
        keep = torch.tensor(sorted(set(allowed)), device=scores.device)
        if not torch.isfinite(scores[b, keep]).any():
            return  # another processor ruled all of them out (min_new_tokens): never leave no token at all
        masked = torch.full_like(scores[b], float("-inf"))
        masked[keep] = scores[b, keep]
        scores[b] = masked


def spoken(processors, b: int, answer: list[int]) -> list[int]:
    """The answer's tokens as its text reads them: without an opening article (and a word after it) that goes
    straight on into a cited value (ValueDecoding.opening_article); the tokens themselves otherwise."""
    for p in processors or ():
        if isinstance(p, ValueDecoding):
            return answer[p.opening_article(b, answer):]
    return answer


def may_open_value(processors, b: int, answer: list[int]) -> bool:
    """The answer so far is an opening article (and at most a word) that may yet be left out: a stream holds it
    back (ValueDecoding.holds_opening)."""
    return any(isinstance(p, ValueDecoding) and p.holds_opening(b, answer) for p in processors or ())


class SpokenStreamer:
    """A transformers streamer (put / end) that passes on what `spoken` keeps: an opening article (and a word after
    it) waits for the next word, and is dropped if a cited value follows. One answer (batch size 1)."""

    def __init__(self, inner, processors):
        self.inner, self.processors = inner, processors
        self.prompt_pending = True  # generate() puts the prompt first: passed on as it is
        self.answer: list[int] = []
        self.held = False

    def put(self, value) -> None:
        if self.prompt_pending:
            self.prompt_pending = False
            self.inner.put(value)
            return
        for t in value.reshape(-1).tolist():
            self.answer.append(t)
            if may_open_value(self.processors, 0, self.answer):
                self.held = True  # the opening waits
                continue
            out = spoken(self.processors, 0, self.answer) if self.held else [t]
            self.held = False
            self.inner.put(torch.tensor(out))

    def end(self) -> None:
        if self.held:  # an opening that no value followed
            self.inner.put(torch.tensor(self.answer))
        self.inner.end()


def _first_tokens(tokenizer, text: str) -> set[int]:
    """The first token of `text` at the start of a line and after a space."""
    return {tokenizer(form, add_special_tokens=False)["input_ids"][0] for form in (text, " " + text)}


def _repeats(answer: list[int], n: int = 3, word=None) -> set[int]:
    """The tokens that would make the answer's last n-gram one it has said before; with `word` (token ->
    its text, case-blind) tokens compare by their words, so " The country is" repeats "The country is"."""
    if len(answer) < n:
        return set()
    key = answer if word is None else [word(t) for t in answer]
    tail = key[len(key) - n + 1:]
    nxt = {key[i + n - 1] for i in range(len(key) - n + 1) if key[i:i + n - 1] == tail}
    return nxt if word is None else {t for t, k in zip(answer, key) if k in nxt}


def _continuations(forms, answer: list[int], word) -> set[int]:
    """The next tokens of the names in `forms` that the answer ends inside (a proper prefix; a lone opening word
    like "The" does not count as started)."""
    nxt = set()
    for ids in forms:
        for j in range(min(len(ids) - 1, len(answer)), 0, -1):
            if answer[-j:] == ids[:j] and not (j == 1 and word(ids[0]) in _WEAK_FIRST):
                nxt.add(ids[j])
                break
    return nxt


def _contains(answer: list[int], forms) -> bool:
    """One of the token forms occurs in the answer."""
    return any(answer[i:i + len(ids)] == ids for ids in forms if ids for i in range(len(answer) - len(ids) + 1))


def _said(v: CitedValue, answer: list[int]) -> bool:
    """The answer names the value other than by restating the question: an occurrence whose token before it
    is one the value follows in the question ("of Stade de France") is the question again."""
    for ids in v.forms:
        for i in range(len(answer) - len(ids) + 1):
            if answer[i:i + len(ids)] == ids and not (i > 0 and answer[i - 1] in v.restated_after):
                return True
    return False


def value_processors(kb: KBInputs | None, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                     stop_ids: list[int], enabled: bool = True, questions: list[str] | None = None,
                     note_logprob: bool = False) -> list:
    """The logits processors of one generate() call: [ValueDecoding] when a KB is read (its prefill attention
    is recorded for it: always for pruned KBs, whose record holds only the kept leaves), else none."""
    if not enabled or kb is None:
        return []
    if not kb.record and kb.pruned is None and kb.size > FLAT_RECORD_MAX:
        return []  # recording a large flat KB's prefill attention ([B, T, N] per KB layer) costs too much memory
    kb.record = True
    return [ValueDecoding(kb, tokenizer, prompt_ids, prompt_mask, stop_ids, questions=questions,
                          note_logprob=note_logprob)]
