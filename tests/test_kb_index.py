"""HiKVP on real KB directories with the real SmolLM2 + shipped adapter: live add/remove, compaction,
and pruned == flat when nothing is pruned (multi-segment KBs with tombstones, so the id mapping is real)."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from atlaskv.kb.triples import Triple
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.model.pruning import PruneConfig
from atlaskv.kb.store import KnowledgeBase

NEW = ("Ada Lovelace", "place of birth", "London")
QUESTION = "What is the place of birth of Ada Lovelace?"


@pytest.fixture(scope="module")
def akv(trained_model):
    return trained_model


@pytest.fixture(scope="module")
def demo_kb(tmp_path_factory, demo_facts, encoder):
    return KnowledgeBase.build(demo_facts, tmp_path_factory.mktemp("ix") / "kb", encoder=encoder)


def test_build_indexes_every_entry(demo_kb):
    info = demo_kb.info()["index"]
    assert info["leaves"] == demo_kb.num_entries and info["built_version"] == demo_kb.version == 1
    assert info["roots"] == 16 and 200 < info["inters"] <= 270 and info["largest_root_share"] < 0.3
    h = demo_kb.hierarchy()
    assert np.array_equal(np.sort(h.inter_children), demo_kb.embeddings()[0])
    assert KnowledgeBase.open(demo_kb.path, verify=True).verify()["orphans"] == []


def test_add_is_cited_next_call_and_remove_is_never_attended(akv, demo_kb):
    r = demo_kb.add([NEW])
    assert r.added == 1
    ix = demo_kb.info()["index"]
    assert ix["added_since_build"] == 1 and ix["built_version"] == 1  # placed live, no re-clustering
    new_id = int(demo_kb.embeddings()[0][-1])
    assert new_id in demo_kb.hierarchy().inter_children
    ans = akv.ask(QUESTION, demo_kb, max_new_tokens=16)
    assert ans.pruned and ans.citations[0][0] == Triple(*NEW)

    demo_kb.remove([NEW])
    kb_in = akv.kb_inputs(demo_kb, record=True)
    akv.generate(QUESTION, kb_in, max_new_tokens=4)
    pos_removed = int(kb_in.pruned.keys.table.positions(np.array([new_id]))[0])
    for layer, pos in kb_in.selected.items():
        assert pos_removed not in pos.tolist(), f"layer {layer} attended a removed entry"
    ans = akv.ask(QUESTION, demo_kb, max_new_tokens=4)
    assert Triple(*NEW) not in [t for t, _ in ans.citations]


def test_compact_reclusters_live_entries(demo_kb):
    demo_kb.add([("Grace Hopper", "place of birth", "New York City")])
    demo_kb.compact()
    kb = KnowledgeBase.open(demo_kb.path, verify=True)
    ix = kb.info()["index"]
    assert ix["built_version"] == kb.version and ix["added_since_build"] == 0
    assert ix["leaves"] == kb.num_entries
    assert np.array_equal(np.sort(kb.hierarchy().inter_children), kb.embeddings()[0])


def test_pruned_keeping_everything_equals_flat_on_a_kb_directory(akv, tmp_path, encoder):
    facts = [("Elvis Presley", "place of death", "Memphis"), ("Memphis", "time zone", "Central Time Zone"),
             ("Michael Jackson", "place of birth", "Gary"), ("Canada", "capital", "Ottawa"),
             ("Humphrey Bogart", "spouse", "Lauren Bacall"), ("Ottawa", "country", "Canada")]
    kb = KnowledgeBase.build(facts[:4], tmp_path / "kb", encoder=encoder)
    kb.add(facts[4:])                       # a second segment, placed live
    kb.remove([facts[1]])                   # a tombstone inside the first
    everything = PruneConfig(top_k=(10**6,) * 3)
    ids = akv.chat_ids("Who is the spouse of Humphrey Bogart?")
    with torch.no_grad():
        flat = akv.kb_inputs(kb, prune=False, record=True)
        pruned = akv.kb_inputs(kb, prune=True, prune_config=everything, record=True)
        for kb_in in (flat, pruned):
            kb_in.question_emb = akv.question_embedding("Who is the spouse of Humphrey Bogart?")
        out_flat = akv.model(ids, atlaskv_kb=flat).logits
        out_pruned = akv.model(ids, atlaskv_kb=pruned).logits
    assert (out_flat - out_pruned).abs().max().item() < 1e-4
    (p_pos, p_w), = pruned.summed_attention()
    (f_pos, f_w), = flat.summed_attention()
    cite_p = akv.cite(kb, pruned, p_pos)
    cite_f = akv.cite(kb, flat, f_pos)
    assert cite_p == cite_f and len(cite_p) == 5 and Triple(*facts[1]) not in cite_p
    torch.testing.assert_close(p_w, f_w, atol=1e-4, rtol=1e-4)


def test_index_rebuild_reads_segments_without_removed_entries(tmp_path, encoder):
    facts = [(f"person {i}", "place of birth", f"city {i % 7}") for i in range(60)]
    kb = KnowledgeBase.build(facts[:40], tmp_path / "kb", encoder=encoder, index=False)
    assert kb.hierarchy() is None
    kb.add(facts[40:])
    kb.remove(facts[:5])
    kb.build_index()
    h = KnowledgeBase.open(kb.path, verify=True).hierarchy()
    assert np.array_equal(np.sort(h.inter_children), kb.embeddings()[0])  # live ids only, both segments
