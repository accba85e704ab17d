"""The refusal rule: when the KB does not back an answer, `ask`, `chat` and `serve` say REFUSAL instead.

Read from the prefill's citations (the facts with the most KB attention, most first) and the answer: refuse
when the most cited fact is about an entity the question does not name, or when its value does not stand out
(support_of) by REFUSE_BELOW and the answer does not name that value either (calibrated on training facts:
defaults.py). Where the value's support is low the verdict waits for the answer (`verdict`: "if_unnamed"), so
a server holds such an answer's stream back until it names the value (model/batching.py). Value decoding's
guards read the prefill part alone, at TRUSTED_SUPPORT (model/decoding.py).
"""
from __future__ import annotations

from typing import Literal

from atlaskv.defaults import REFUSE_BELOW
from atlaskv.kb.triples import Triple

Verdict = Literal["answer", "refuse", "if_unnamed"]


def support_of(citations) -> float:
    """How far the most-cited value stands out, from the cited facts ((triple, weight), most attended first):
    the weight of the facts that name the first one's value (they agree: John F. Kennedy's and Robert F.
    Kennedy's burial facts both back "Arlington National Cemetery") over the heaviest fact naming another
    value. inf when no cited fact disagrees, 0 without citations. The refusal rule's signal (Answer.support,
    eval grounding --refuse-below)."""
    if not citations:
        return 0.0
    top = _words(citations[0][0].tail)
    same = sum(float(w) for t, w in citations if _words(t.tail) == top)
    other = max((float(w) for t, w in citations if _words(t.tail) != top), default=0.0)
    return same / other if other > 0 else float("inf")


def names_head(question: str, triple: Triple) -> bool:
    """The question names the fact's head (its words in a row, case and punctuation aside): a fact about
    another entity backs no answer, however much attention it draws ("the country of Mount Kilimanjaro"
    before the KB knows it cites Petaluma's country)."""
    return names_value(question, triple.head)


def _words(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def names_value(answer: str, value: str) -> bool:
    """The answer names the value as a whole (its words in a row, case and punctuation aside)."""
    v = _words(value)
    return bool(v) and f" {v} " in f" {_words(answer)} "


def verdict(question: str, citations, min_support: float = REFUSE_BELOW) -> Verdict:
    """The rule from the prefill alone: "refuse" (no citation, or the most-cited fact is about an entity the
    question does not name), "answer" (its value stands out by `min_support`, or refusal is off:
    `min_support` <= 0), or "if_unnamed": refuse unless the answer names the most-cited value."""
    if min_support <= 0:
        return "answer"
    if not citations:
        return "refuse"
    if question and not names_head(question, citations[0][0]):
        return "refuse"
    return "answer" if support_of(citations) >= min_support else "if_unnamed"


def refuses(question: str, citations, min_support: float = REFUSE_BELOW, answer: str | None = None) -> bool:
    """The refusal rule (`verdict`), given the answer's text; `answer=None` reads the prefill alone (a low
    support is then refused). Without a question the head check is skipped; `min_support` <= 0: never."""
    v = verdict(question, citations, min_support)
    if v != "if_unnamed":
        return v == "refuse"
    return answer is None or not names_value(answer, citations[0][0].tail)
