"""Grounding evaluation: metrics, KB construction, and the shipped adapter on real questions."""
import json

import numpy as np
import pytest

from atlaskv.evaluation.metrics import answer_flags, contains_answer, loops, names_exactly, says_refusal
from atlaskv.evaluation.pool import kb_chunks, load_pool


@pytest.mark.parametrize("answer, gold, ok", [
    ("The capital of Canada is Ottawa.", "Ottawa", True), ("the CAPITAL is ottawa!", "Ottawa", True),
    ("Ottawan", "Ottawa", False), ("It is Washington, D.C..", "Washington, D.C.", True), ("", "x", False)])
def test_contains_answer(answer, gold, ok):
    assert contains_answer(answer, gold) is ok


@pytest.mark.parametrize("answer, ok", [("I don't know.", True), ("i DON'T know", True), ("I know.", False),
                                        ("Ottawa", False), ("Sorry, I don't know. Maybe Ottawa?", True)])
def test_says_refusal(answer, ok):
    assert says_refusal(answer) is ok


@pytest.mark.parametrize("answer, gold, ok", [
    ("The sibling of Robert F. Kennedy is John F. Kennedy.", "John F. Kennedy", True),
    ("The John F. Kennedy Jr. was a U.S Attorney General", "John F. Kennedy", False),   # runs on into another name
    ("Lake Michigan is the answer.", "Michigan", False),                                 # runs in from another name
    ("In Memphis, Tennessee.", "Memphis", True), ("The spouse is Lauren Bacceaga.", "Lauren Bacall", False),
    ("the time zone is central time zone", "Central Time Zone", True), ("", "x", False)])
def test_names_exactly(answer, gold, ok):
    assert names_exactly(answer, gold) is ok


def test_answer_exact_asks_for_the_gold_value_first_no_loop_and_an_ended_turn():
    values = ["Memphis", "Central Time Zone", "Eastern Time Zone", "Tupelo"]
    q = "What is the time zone of Memphis?"
    good = answer_flags("The time zone of Memphis is Central Time Zone.", "Central Time Zone", values, True, q)
    assert good["exact"] and good["em"] and good["first_named"] == "Central Time Zone"  # the question's own value skipped
    assert not answer_flags("The time zone of Memphis is Central Time Zone.", "Central Time Zone", values, False, q)["exact"]
    other_first = answer_flags("Eastern Time Zone, not Central Time Zone.", "Central Time Zone", values, True, q)
    assert other_first["em"] and not other_first["exact"]
    looping = "Central Time Zone. It is in the Central Time Zone and the Central Time Zone"
    assert loops(looping) and not answer_flags(looping, "Central Time Zone", values, True, q)["exact"]
    assert not loops("The capital of Canada is Ottawa.")
    restated = "The parent award of Primetime Emmy Award for Best Actor is Primetime Emmy Award."
    assert loops(restated) and not loops(restated, "What is the parent award of Primetime Emmy Award for Best Actor?")


@pytest.fixture(scope="module")
def pool(shared, encoder):
    return load_pool(shared / "eval" / "fb15k-para", encoder)


@pytest.mark.parametrize("size, distractors", [(10, "random"), (1000, "same-head"), (50, "same-head")])
def test_kb_chunks_hold_golds_and_have_size(pool, size, distractors):
    qidx = np.random.default_rng(0).permutation(len(pool.questions))[:40]
    seen = []
    for qs, rows in kb_chunks(pool, qidx, size, distractors, np.random.default_rng(1)):
        assert len(rows) == size and len(set(rows.tolist())) == size
        assert {pool.index[pool.questions[q].triple] for q in qs} <= set(rows.tolist())
        if distractors == "same-head":
            heads = {pool.questions[q].head for q in qs}
            same = sum(pool.triples[r].head in heads for r in rows)
            assert same > len(qs)  # facts about the same entities were put in first
        seen += list(qs)
    assert sorted(seen) == sorted(qidx.tolist())


@pytest.mark.slow
def test_shipped_adapter_grounds_real_questions(shared, encoder, tmp_path):
    pytest.importorskip("gguf")
    from atlaskv.evaluation.grounding import eval_grounding
    from atlaskv.model.atlaskv import AtlasKV

    akv = AtlasKV.from_pretrained()
    saved = tmp_path / "answers.jsonl"
    res = eval_grounding(shared / "eval" / "fb15k", [100], akv, encoder, n_questions=32, answer_questions=8,
                         progress=False, save_answers=saved, refuse_below=5.88, lacking_ratio=0)
    row = res["results"][0]
    assert (res["refuse_below"], res["lacking_ratio"]) == (5.88, 0)  # the rule the refused_* fields were scored by
    assert 0 <= row["refused_with_gold"] <= 1 and 0 <= row["refused_without_gold"] <= 1
    assert row["n_questions"] == 32 and row["n_answer_questions"] == 8
    answers = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(answers) == 8 and all(a["answer"] and a["gold"] and a["top_citation"] for a in answers)
    assert row["answer_exact"] == sum(a["exact"] for a in answers) / 8 <= row["answer_em"]
    assert row["answer_loops"] == sum(a["loop"] for a in answers) / 8
    for a in answers:  # the refusal signals of both answers, as a refusal rule reads them (refusal_rules.py)
        sig, without = a["signals"], a["signals_without_gold"]
        assert sig["top_citation"] == a["top_citation"] and len(sig["key_cosine"]) == 5
        assert sig["head_named"] == (a["top_citation"][0].casefold() in a["question"].casefold())
        assert -1 <= without["key_cosine"][0] <= 1
        if a["top_is_gold"]:  # removed, the gold fact cannot be cited
            assert without["top_citation"] != a["top_citation"]
    # the gold fact's key is its question's nearest: its cosine beats the facts cited after it
    assert sum(a["signals"]["key_cosine"][0] == max(a["signals"]["key_cosine"]) for a in answers) >= 7
    assert row["acc1"] >= 0.9  # the trained adapter finds the fact (chance would be 0.01)
    assert set(row["acc1_by_layer"]) == {str(l) for l in akv.adapter.config.kb_layers}
    json.dumps(res)  # the contract output is plain JSON
