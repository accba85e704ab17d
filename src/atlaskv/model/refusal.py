"""The refusal rule: when the KB does not back an answer, `ask`, `chat` and `serve` say REFUSAL instead.

Read from the prefill's citations (the facts with the most KB attention, most first) and the answer: refuse
when no cited fact backs an answer (`backing`: the most cited one if the question names its head, else a
fact of the same kind about the entity it names, cited after the neighbour's), or when the question reads
more like a fact the KB lacks about that entity than like the backing one (probes.py: LACKING_RATIO); when the most cited one backs
it, refuse if its value does not stand out (support_of) by REFUSE_BELOW and the answer does not name that
value either (calibrated on training facts: defaults.py); when a later one does, refuse unless the answer
names its value. Where the value's support is low the verdict waits for the answer (`verdict`: "if_unnamed"), so
a server holds such an answer's stream back until it names the value (model/batching.py). Value decoding's
guards read the prefill part alone, at TRUSTED_SUPPORT (model/decoding.py).
"""
from __future__ import annotations

from typing import Literal

from atlaskv.defaults import LACKING_RATIO, REFUSE_BELOW
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


def backing(question: str, citations) -> int | None:
    """Which cited fact can back an answer (its index in `citations`), None if none can. The most-cited one if
    the question names its head (without a question, the most-cited one). Otherwise the attention put a
    neighbour entity's fact first, and a fact about the entity the question does name, cited after it, backs
    the answer only if it is of the same kind: its relation's words hold the first one's, or the other way
    round ("Where can Mauricie be found?": The Blind Beggar's "location" first, Mauricie's "administrative
    location" after it), and the neighbour's name shares no word with the question. A fact of another kind
    about the named entity (its "film format" for "In what language was X made?") is what a same-head KB offers
    when the asked fact is missing, and a neighbour that shares a word ("Auburn, Washington" first for "Which
    country is Auburn, Alabama in?", then Alabama's country) means the named entity is only part of a longer
    name: either backs nothing."""
    if not citations:
        return None
    if not question or names_head(question, citations[0][0]):
        return 0
    if set(_words(citations[0][0].head).split()) & set(_words(question).split()) - _RELATION_STOP:
        return None  # the neighbour shares a name with the question (Auburn, Washington for Auburn, Alabama)
    first = _relation_words(citations[0][0].relation)
    for i, (t, _) in enumerate(citations[1:], 1):
        words = _relation_words(t.relation)
        if names_head(question, t) and words and first and (words <= first or first <= words):
            return i
    return None


def _relation_words(relation: str) -> set[str]:
    """A relation's content words: "administrative location", "/location/location/containedby" and
    "birthPlace" alike."""
    spaced = "".join(" " + c if c.isupper() else c for c in relation)
    return set(_words(spaced).split()) - _RELATION_STOP


_RELATION_STOP = {"of", "the", "a", "an", "in", "on", "at", "by", "for", "to", "is", "has", "was", "s"}


def verdict(question: str, citations, min_support: float = REFUSE_BELOW, lacking: float | None = None,
            lacking_ratio: float = LACKING_RATIO) -> Verdict:
    """The rule from the prefill alone: "refuse" (no cited fact backs an answer: `backing`; or a fact the KB
    lacks about the same entity draws the question `lacking` >= `lacking_ratio` times more than the backing
    one: probes.py; `lacking_ratio` 0: never), "answer" (the most-cited fact backs it and its value stands out
    by `min_support`; or refusal is off: `min_support` <= 0), or "if_unnamed": refuse unless the answer names
    the backing fact's value (`must_name`): its support is low, or a neighbour entity's fact was cited before
    it."""
    if min_support <= 0:
        return "answer"
    at = backing(question, citations)
    if at is None or (lacking is not None and 0 < lacking_ratio <= lacking):
        return "refuse"
    if at > 0:
        return "if_unnamed"
    return "answer" if support_of(citations) >= min_support else "if_unnamed"


def must_name(question: str, citations) -> str | None:
    """The value an "if_unnamed" answer has to name: the backing fact's."""
    at = backing(question, citations)
    return None if at is None else citations[at][0].tail


def refuses(question: str, citations, min_support: float = REFUSE_BELOW, answer: str | None = None,
            lacking: float | None = None, lacking_ratio: float = LACKING_RATIO) -> bool:
    """The refusal rule (`verdict`), given the answer's text; `answer=None` reads the prefill alone (a low
    support, or a backing fact cited after a neighbour's, is then refused). Without a question the head
    check is skipped; `min_support` <= 0: never. `lacking`: the lacking-key ratio (probes.Lacking.ratio)."""
    v = verdict(question, citations, min_support, lacking, lacking_ratio)
    if v != "if_unnamed":
        return v == "refuse"
    return answer is None or not names_value(answer, must_name(question, citations))
