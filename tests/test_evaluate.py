"""Grounding evaluation: metrics, KB construction, and the shipped adapter on real questions."""
import json

import numpy as np
import pytest

from atlaskv.evaluation.metrics import contains_answer, says_refusal
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
def test_shipped_adapter_grounds_real_questions(shared, encoder):
    pytest.importorskip("gguf")
    from atlaskv.evaluation.grounding import eval_grounding
    from atlaskv.model.atlaskv import AtlasKV

    akv = AtlasKV.from_pretrained()
    res = eval_grounding(shared / "eval" / "fb15k", [100], akv, encoder, n_questions=32, answer_questions=8,
                         progress=False)
    row = res["results"][0]
    assert row["n_questions"] == 32 and row["n_answer_questions"] == 8
    assert row["acc1"] >= 0.9  # the trained adapter finds the fact (chance would be 0.01)
    assert set(row["acc1_by_layer"]) == {str(l) for l in akv.adapter.config.kb_layers}
    json.dumps(res)  # the contract output is plain JSON
