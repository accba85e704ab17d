"""What the evaluation scores: answer matching (case- and punctuation-insensitive) and retrieval hits."""
from __future__ import annotations

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
