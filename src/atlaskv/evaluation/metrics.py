"""What the evaluation scores: answer matching (case- and punctuation-insensitive) and retrieval hits."""
from __future__ import annotations

import re
import string

from atlaskv.defaults import REFUSAL


def normalize(text: str) -> str:
    text = text.casefold().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def contains_answer(answer: str, gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(answer)} "


def says_refusal(answer: str) -> bool:
    """The model's own trained refusal ("I don't know.") in a greedy answer."""
    return contains_answer(answer, REFUSAL)


def rank_hits(ranked: list[list[int]], gold: list[int]) -> tuple[int, int]:
    """(#gold ranked first, #gold in the top 5) over samples; `ranked` is best first."""
    hits1 = sum(bool(r) and r[0] == g for r, g in zip(ranked, gold))
    return hits1, sum(g in r[:5] for r, g in zip(ranked, gold))


# ------------------------------------------------------------------------------------------------ what a user reads
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
# words that may stand capitalised before a value without being part of another name ("In Memphis, ...")
_OPENERS = {"the", "a", "an", "in", "at", "on", "of", "is", "was", "to", "from", "by", "and", "it", "its", "his",
            "her", "their", "yes", "no"}


def _words(text: str) -> list[tuple[str, int, int]]:
    """(normalised word, start, end) of every word in `text`."""
    return [(normalize(m.group()), m.start(), m.end()) for m in _WORD.finditer(text)]


def names_exactly(answer: str, gold: str) -> bool:
    """The gold value appears as a whole name: its words in a row, not run on into a longer name by an
    adjacent capitalised word ("John F. Kennedy Jr." does not name "John F. Kennedy"; "Lake Michigan" does
    not name "Michigan"; "Memphis, Tennessee" and "In Memphis" name "Memphis")."""
    g = [w for w, _, _ in _words(gold)]
    words = _words(answer)
    if not g:
        return False
    for i in range(len(words) - len(g) + 1):
        if [w for w, _, _ in words[i:i + len(g)]] != g:
            continue
        after = words[i + len(g)] if i + len(g) < len(words) else None
        before = words[i - 1] if i > 0 else None
        run_on = after is not None and not answer[words[i + len(g) - 1][2]:after[1]].strip() \
            and answer[after[1]].isupper()
        run_in = before is not None and not answer[before[2]:words[i][1]].strip() \
            and answer[before[1]].isupper() and before[0] not in _OPENERS
        if not run_on and not run_in:
            return True
    return False


def first_named(answer: str, values: list[str]) -> str | None:
    """The KB value the answer names first (the longest where several start at the same word): a stricter
    reading than "the gold tail appears" ("The English language is French." names English first)."""
    text = f" {normalize(answer)} "
    hits = [(text.find(f" {normalize(t)} "), -len(t), t) for t in values if normalize(t) and f" {normalize(t)} " in text]
    return min(hits)[2] if hits else None


def loops(answer: str, question: str = "", n: int = 3) -> bool:
    """A repeated word n-gram: the answer runs in circles ("Attorney General Attorney General ..."). An
    n-gram the question holds may come twice (restating a head that contains the value is not a loop:
    "The parent award of Primetime Emmy Award for ... is Primetime Emmy Award.")."""
    def grams(text):
        w = normalize(text).split()
        return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    asked = set(grams(question))
    seen: set = set()
    for g in grams(answer):
        if g in seen and g not in asked:
            return True
        seen.add(g)
    return False


def answer_flags(answer: str, gold: str, kb_values: list[str], ended: bool, question: str = "") -> dict:
    """How an answer reads for the user (eval grounding's answer_exact and its parts):
    em: the gold value appears (answer_em); named: as a whole name (names_exactly); gold_first: it is the
    first KB value the answer names (values the question itself names do not count: answers restate the
    question); loop: a repeated word 3-gram; ended: the model closed its turn within the token budget.
    exact = named and gold_first and not loop and ended."""
    named = names_exactly(answer, gold)
    asked = f" {normalize(question)} "
    first = first_named(answer, [v for v in kb_values if v == gold or f" {normalize(v)} " not in asked])
    loop = loops(answer, question)
    return {"em": contains_answer(answer, gold), "named": named,
            "first_named": first, "gold_first": first is not None and normalize(first) == normalize(gold),
            "loop": loop, "ended": ended,
            "exact": named and first is not None and normalize(first) == normalize(gold) and not loop and ended}
