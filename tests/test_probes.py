"""Lacking keys (model/probes.py): a key scored as if it were stored draws exactly the attention a stored copy
of it draws; the refusal rule refuses a question that reads like a fact the KB lacks about its entity.

The equalities run on tiny random-weight models; the refusals on the real SmolLM2 + shipped adapter and real
FB15k-237 facts."""
import numpy as np
import pytest
import torch

from atlaskv.kb.triples import Triple
from atlaskv.kb.view import KBView
from atlaskv.model.attention import attach
from atlaskv.model.kb_inputs import KBInputs, merged, rows_from
from atlaskv.model.probes import absent_key_weights
from atlaskv.defaults import LACKING_RATIO, REFUSE_BELOW
from atlaskv.model.batching import BatchDecoder
from atlaskv.model.refusal import refuses, verdict
from test_attention import IDS, random_adapter, random_kb, tiny_model
from test_pruning import pruned_kb


def dense(kb: KBInputs, n: int, sample: int = 0, mask=None) -> torch.Tensor:
    pos, w = kb.summed_attention(mask)[sample]
    return torch.zeros(n, dtype=w.dtype).index_add_(0, pos, w)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("scale", [None, 5.0])
def test_a_stored_key_scored_as_absent_draws_what_it_drew(kind, scale):
    model = tiny_model(kind)
    adapter = random_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(23)
    kb = KBInputs(keys, values, record=True, scale_factor=scale)
    model(IDS, atlaskv_kb=kb)
    torch.testing.assert_close(absent_key_weights(adapter, kb, keys), dense(kb, 23), atol=1e-6, rtol=1e-5)


def test_the_same_holds_pruned_where_every_layer_keeps_the_entry():
    model = tiny_model("llama")
    adapter = random_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(60)
    kb = KBInputs(pruned=pruned_kb(keys, values, (10**6,) * 3), record=True, scale_factor=30.0)
    model(IDS, atlaskv_kb=kb)
    torch.testing.assert_close(absent_key_weights(adapter, kb, keys), dense(kb, 60), atol=1e-6, rtol=1e-5)


def test_a_merged_prefill_hands_each_row_its_own_readers():
    """Serving prefills several requests over one snapshot together (kb_inputs.merged); each row's lacking keys
    must read its own queries and normaliser, padding excluded."""
    model = tiny_model("llama")
    adapter = random_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(40)
    probe = torch.randn(3, keys.shape[1], generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([[0, 0, 5, 17, 3, 44], [7, 9, 11, 13, 2, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rows = [KBInputs(pruned=pruned_kb(keys, values, (10**6,) * 3), record=True, scale_factor=30.0)]
    rows.append(KBInputs(pruned=rows[0].pruned, record=True, scale_factor=30.0))
    batch = merged(rows, mask)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), atlaskv_kb=batch)
    rows_from(batch, rows)
    for b in range(2):
        alone = KBInputs(pruned=rows[0].pruned, record=True, scale_factor=30.0)
        real = ids[b:b + 1, int((mask[b] == 0).sum()):]
        model(real, atlaskv_kb=alone)
        got = absent_key_weights(adapter, rows[b], probe, 0, mask[b:b + 1])
        torch.testing.assert_close(got, absent_key_weights(adapter, alone, probe), atol=1e-5, rtol=1e-4)


def test_without_a_recorded_prefill_it_says_so():
    model = tiny_model("llama")
    adapter = random_adapter(model)
    keys, values = random_kb(5)
    with pytest.raises(ValueError, match="record=True"):
        absent_key_weights(adapter, KBInputs(keys, values), keys)


def test_the_rule_refuses_when_a_lacking_fact_reads_better():
    cited = [(Triple("Linda Ronstadt", "nationality", "United States of America"), 1.0)]
    q = "Is Linda Ronstadt male or female?"
    assert verdict(q, cited) == "answer"
    assert verdict(q, cited, lacking=1.2) == "answer"   # a near reading: the backing fact still stands
    assert verdict(q, cited, lacking=40.0) == "refuse"
    assert refuses(q, cited, answer="The United States of America.", lacking=40.0)
    assert verdict(q, cited, min_support=0, lacking=40.0) == "answer"  # refusal off
    assert verdict(q, cited, lacking=40.0, lacking_ratio=50.0) == "answer"  # a user's own threshold
    assert verdict(q, cited, lacking=40.0, lacking_ratio=0) == "answer"  # the lacking check off
    assert refuses(q, cited, answer="The United States of America.", lacking=3.0, lacking_ratio=2.0)


def test_an_arrays_view_keys_its_relations_as_kg2kv_does():
    triples = [Triple("Linda Ronstadt", "nationality", "United States of America"),
               Triple("Tucson", "/location/location/containedby", "Arizona")]
    view = KBView.from_arrays(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), triples)
    t = view.key_templates()
    assert set(t) == {"nationality", "/location/location/containedby"}
    assert all("{entity}" in x for x in t.values())
    assert view.without(np.array([0])).key_templates() == t  # the vocabulary, not the live rows


# ---------------------------------------------------------------------------------------------------- real

@pytest.fixture(scope="module")
def demo_kb(tmp_path_factory, demo_facts, encoder):
    from atlaskv.kb.store import KnowledgeBase

    return KnowledgeBase.build(demo_facts, tmp_path_factory.mktemp("probes") / "kb", encoder=encoder)


@pytest.mark.slow
def test_a_question_about_a_fact_the_kb_lacks_is_refused(trained_model, demo_kb):
    """The demo KB holds nine facts about John F. Kennedy, his place of death (Dallas) among them, but not his
    birthplace: the attention cites his place of death first and the answer says "Dallas"."""
    ans = trained_model.ask("What is the place of birth of John F. Kennedy?", demo_kb)
    assert ans.citations[0][0].head == "John F. Kennedy"
    assert ans.lacking.relation == "place of birth" and ans.lacking.ratio >= LACKING_RATIO
    refused = ans.or_refusal()
    assert refused.refused and refused.missing == ("John F. Kennedy", "place of birth")
    # serving decides at the prefill: nothing is streamed
    seq = BatchDecoder(trained_model).start("What is the place of birth of John F. Kennedy?", demo_kb,
                                            refuse_below=REFUSE_BELOW)
    assert seq.done and seq.answer.refused and seq.generated == []
    # with the lacking check off (ask / chat / serve --lacking-ratio 0) the answer names his place of death,
    # which the support rule lets through: the value is the backing fact's and the answer names it
    kept = ans.or_refusal(REFUSE_BELOW, lacking_ratio=0)
    assert not kept.refused and "Dallas" in kept.text and kept.missing is None
    seq = BatchDecoder(trained_model).start("What is the place of birth of John F. Kennedy?", demo_kb,
                                            refuse_below=REFUSE_BELOW, lacking_ratio=0)
    assert not seq.done and seq.answer.missing is None


@pytest.mark.slow
@pytest.mark.parametrize("question, value", [("Where did John F. Kennedy die?", "Dallas"),
                                             ("Is John F. Kennedy male or female?", "Male"),
                                             ("What is the religion of Robert F. Kennedy?", "Catholicism"),
                                             ("What is the time zone of Memphis?", "Central Time Zone")])
def test_a_question_the_kb_answers_is_not(trained_model, demo_kb, question, value):
    ans = trained_model.ask(question, demo_kb)
    assert ans.lacking is not None and ans.lacking.ratio < LACKING_RATIO
    ans = ans.or_refusal()
    assert not ans.refused and value in ans.text and ans.missing is None


def test_only_relations_the_adapter_learned_are_compared(trained_model):
    """The shipped adapter lists the FB15k-237 relations it was trained on; relation names it never saw are
    left out of the comparison (the check refused 15 % of ParaRel's answerable questions with them in)."""
    from atlaskv.model.probes import _trained_templates

    known = _trained_templates(trained_model.adapter)
    assert "the place of birth of {entity}" in known and "the gender of {entity}" in known
    assert "the component of {entity}" not in known


def test_the_trained_relations_travel_with_the_adapter(tmp_path):
    from atlaskv.model.adapter import KBAdapter

    adapter = random_adapter(tiny_model("llama"))
    adapter.trained_relations = frozenset({"place of birth", "gender"})
    adapter.save_pretrained(tmp_path / "a")
    assert KBAdapter.from_pretrained(tmp_path / "a").trained_relations == {"place of birth", "gender"}
    (tmp_path / "a" / "trained_relations.txt").unlink()  # adapters saved before it: every relation compared
    assert not KBAdapter.from_pretrained(tmp_path / "a").trained_relations


def test_last_tokens_counts_only_the_prompts_end():
    """A chat's earlier turns ("the place of death of Elvis Presley") must not vote for the last question's
    lacking keys: last_tokens equals masking the earlier tokens out."""
    model = tiny_model("llama")
    adapter = random_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(12)
    kb = KBInputs(keys, values, record=True, scale_factor=5.0)
    model(IDS, atlaskv_kb=kb)
    T = IDS.shape[1]
    mask = torch.ones(1, T)
    mask[0, :T - 4] = 0
    torch.testing.assert_close(absent_key_weights(adapter, kb, keys, last_tokens=4),
                               absent_key_weights(adapter, kb, keys, 0, mask))
    torch.testing.assert_close(absent_key_weights(adapter, kb, keys, last_tokens=T), absent_key_weights(adapter, kb, keys))


def test_which_facts_go_together_travels_with_the_adapter(tmp_path):
    from atlaskv.model.adapter import AdapterError, KBAdapter, count_relation_pairs

    facts = [Triple("Linda Ronstadt", "gender", "Female"), Triple("Linda Ronstadt", "place of birth", "Tucson"),
             Triple("Elvis Presley", "gender", "Male"), Triple("Heat", "release medium", "DVD")]
    pairs = count_relation_pairs(facts)
    assert pairs[("gender", "gender")] == 2 and pairs[("gender", "place of birth")] == 1
    assert pairs[("place of birth", "gender")] == 1 and pairs[("gender", "release medium")] == 0
    adapter = random_adapter(tiny_model("llama"))
    adapter.relation_pairs = pairs
    adapter.save_pretrained(tmp_path / "a")
    assert KBAdapter.from_pretrained(tmp_path / "a").relation_pairs == pairs
    (tmp_path / "a" / "relation_pairs.tsv").write_text("gender\tgender\t2\ngender\tplace of birth\n", "utf-8")
    with pytest.raises(AdapterError, match=r"relation_pairs.tsv:2: expected"):
        KBAdapter.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "relation_pairs.tsv").unlink()  # adapters saved before it: no kinds, every relation compared
    assert not KBAdapter.from_pretrained(tmp_path / "a").relation_pairs


def test_a_kind_of_fact_is_compared_where_the_training_heads_held_it_together():
    from atlaskv.defaults import LACKING_KIND_SHARE
    from atlaskv.model.adapter import count_relation_pairs
    from atlaskv.model.probes import _kinds

    adapter = random_adapter(tiny_model("llama"))
    assert _kinds(adapter) is None  # nothing recorded: nothing filtered
    people = [Triple(f"p{i}", r, "x") for i in range(200) for r in ("gender", "place of birth")]
    rare = [Triple("p0", "regular TV show", "x")]  # one head in 200 holding both: under the share
    films = [Triple(f"f{i}", r, "x") for i in range(10) for r in ("release medium", "regular TV show")]
    adapter.relation_pairs = count_relation_pairs(people + rare + films)
    kinds = _kinds(adapter)
    assert 1 / 200 < LACKING_KIND_SHARE
    assert kinds["the place of birth of {entity}"] == {"the place of birth of {entity}", "the gender of {entity}"}
    assert "the place of birth of {entity}" in kinds["the regular TV show of {entity}"]  # 1 of its 11 heads


def test_the_shipped_adapter_knows_which_facts_go_together(trained_model):
    """From the FB15k-237 training facts: a person's place of birth goes with a gender, not with a country of
    origin (a TV show's); a film's release medium not with a regular TV show (an actor's)."""
    from atlaskv.model.probes import _kinds

    kinds = _kinds(trained_model.adapter)
    birth, medium = kinds["the place of birth of {entity}"], kinds["the release medium of {entity}"]
    assert "the gender of {entity}" in birth and "the country of origin of {entity}" not in birth
    assert "the country of origin of {entity}" in medium and "the regular TV show of {entity}" not in medium


def test_the_demo_kb_never_asks_a_person_for_a_country_of_origin(trained_model, demo_kb):
    """Elvis Presley's facts in the demo KB (gender, place of birth, ...) are a person's; "country of origin" is
    in the KB (its films' and TV shows'), but no fact of his kinds goes with it in the adapter's training facts,
    so the check never compares it for him ("Where is Elvis Presley originally from?"); it did in v6."""
    from collections import Counter

    from atlaskv.model.probes import compared_relations

    templates = demo_kb.view().key_templates()
    held = {t.relation for t in demo_kb.triples() if t.head == "Elvis Presley"}
    assert "country of origin" in templates and "place of birth" in held
    rels = compared_relations(trained_model.adapter, templates, held, "place of birth")
    assert "religion" in rels and "place of residence" in rels
    assert "country of origin" not in rels
    pairs, trained_model.adapter.relation_pairs = trained_model.adapter.relation_pairs, Counter()
    try:  # an adapter without relation_pairs.tsv: every trained relation, as in v6
        assert "country of origin" in compared_relations(trained_model.adapter, templates, held, "place of birth")
    finally:
        trained_model.adapter.relation_pairs = pairs


def test_relations_the_adapter_never_saw_are_compared_only_when_asked(trained_model):
    """compared_relations' modes: "trained" (shipped) leaves out any pair with a relation name the adapter never
    trained on; "unseen" compares exactly those pairs (all lacking relations when the backing fact's own name is
    unseen); "every" both. The kinds rule still holds where the adapter knows both relations."""
    from atlaskv.model.probes import compared_relations

    a = trained_model.adapter
    templates = {"place of birth": "the place of birth of {entity}", "gender": "the gender of {entity}",
                 "country of origin": "the country of origin of {entity}",
                 "birthTown": "the birth town of {entity}", "favouriteColour": "the favourite colour of {entity}"}
    held = {"place of birth"}
    assert set(compared_relations(a, templates, held, "place of birth")) == {"gender"}
    assert set(compared_relations(a, templates, held, "place of birth", "unseen")) == {"birthTown", "favouriteColour"}
    assert set(compared_relations(a, templates, held, "place of birth", "every")) == {
        "gender", "birthTown", "favouriteColour"}  # a person's kinds of fact hold no country of origin
    held = {"birthTown"}
    assert compared_relations(a, templates, held, "birthTown") == []
    assert set(compared_relations(a, templates, held, "birthTown", "unseen")) == {
        "place of birth", "gender", "country of origin", "favouriteColour"}
    with pytest.raises(ValueError, match="trained, unseen or every"):
        compared_relations(a, templates, held, "birthTown", "all")
