"""The refusal rule: when the KB does not back an answer, `ask`, `chat` and `serve` say REFUSAL instead.

Read from the prefill's citations (the facts with the most KB attention, most first): refuse when the most
cited fact is about an entity the question does not name, or its value does not stand out (support_of)
by REFUSE_BELOW (calibrated on training facts: defaults.py). Value decoding reads the same rule: an answer
whose top fact the rule accepts is not left to the model's own "I don't know." (model/decoding.py).
"""
from __future__ import annotations

from atlaskv.defaults import REFUSE_BELOW
from atlaskv.kb.triples import Triple


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
    h, q = _words(triple.head), _words(question)
    return bool(h) and f" {h} " in f" {q} "


def _words(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def refuses(question: str, citations, min_support: float = REFUSE_BELOW) -> bool:
    """The refusal rule: the most-cited fact is about an entity the question does not name, or its value does
    not stand out by `min_support` (support_of). Without a question only the second part applies; a
    `min_support` of 0 or less turns refusal off (the server's `--refuse-below 0`)."""
    if min_support <= 0:
        return False
    if not citations:
        return True
    return (bool(question) and not names_head(question, citations[0][0])) or support_of(citations) < min_support
