"""KB directory: build, info, add/remove/compact, atomic commits, corruption and bad input."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from atlaskv.kb.triples import KGFormatError, Triple, read_triples
from atlaskv.kb.store import KBError, KnowledgeBase

FACTS = [("Barack Obama", "place of birth", "Honolulu"), ("Honolulu", "time zone", "Hawaii-Aleutian Time Zone"),
         ("Ada Lovelace", "place of birth", "London"), ("London", "country", "United Kingdom")]


@pytest.fixture()
def small_kb(tmp_path, encoder):
    return KnowledgeBase.build(FACTS, tmp_path / "kb", encoder=encoder)


def test_build_writes_records_embeddings_manifest(small_kb, encoder):
    kb = KnowledgeBase.open(small_kb.path, verify=True)
    assert len(kb) == 4 and kb.num_entries == 4 and kb.version == 1
    info = kb.info()
    for key, typ in {"triples": int, "encoder": str, "dim": int, "format_version": int, "version": int,
                     "bytes_on_disk": int}.items():
        assert isinstance(info[key], typ)
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in kb.path.rglob("*") if p.is_file())
    t = kb.records()
    assert t.column("key_text").to_pylist()[0] == "the place of birth of Barack Obama"
    assert t.column("value_text").to_pylist()[0] == "Honolulu"
    ids, keys, values = kb.embeddings()
    assert keys.dtype == np.float16 and keys.shape == (4, 384) and list(ids) == [0, 1, 2, 3]
    expect = encoder.encode(["the place of birth of Barack Obama"])[0]
    assert np.allclose(keys[0].astype(np.float32), expect, atol=2e-3)
    # embeddings are memory-mappable .npy files
    seg = kb.manifest["segments"][0]
    mm = np.load(kb.path / seg["keys"], mmap_mode="r")
    assert isinstance(mm, np.memmap) and mm.shape == (4, 384)


def test_add_remove_compact_keep_ids_and_counts(small_kb):
    kb = small_kb
    r = kb.add([("Alan Turing", "place of birth", "Maida Vale"), FACTS[0]])
    assert (r.added, r.duplicates, r.version) == (1, 1, 2) and len(kb) == 5
    r = kb.remove([FACTS[1], ("Nobody", "place of birth", "Nowhere")])
    assert (r.removed, r.not_found, r.version) == (1, 1, 3) and len(kb) == 4
    assert Triple(*FACTS[1]) not in kb.triples()
    ids, keys, _ = kb.embeddings()
    assert list(ids) == [0, 2, 3, 4] and keys.shape[0] == 4
    kb.compact()
    kb2 = KnowledgeBase.open(kb.path, verify=True)
    assert kb2.version == 4 and len(kb2) == 4 and len(kb2.manifest["segments"]) == 1
    assert list(kb2.embeddings()[0]) == [0, 2, 3, 4]
    assert kb2.verify()["orphans"] == []
    # re-adding a removed triple is allowed and gets a new id
    kb2.add([FACTS[1]])
    assert len(kb2) == 5 and kb2.embeddings()[0][-1] == 5


def test_both_directions_cite_one_triple(tmp_path, encoder):
    kb = KnowledgeBase.build([("Apple", "produces", "iPhone")], tmp_path / "kb", encoder=encoder,
                             directions="both")
    assert len(kb) == 1 and kb.num_entries == 2
    t = kb.records()
    assert t.column("key_text").to_pylist() == ["the product of Apple", "the producer of iPhone"]
    kb.remove([("Apple", "produces", "iPhone")])
    assert len(kb) == 0 and kb.num_entries == 0


def test_relation_templates_are_cached_in_the_kb(small_kb):
    m = json.loads((small_kb.path / "manifest.json").read_text())
    assert m["relation_templates"]["tail\tplace of birth"] == "the place of birth of {entity}"


def test_bad_input_writes_nothing(tmp_path, encoder):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\nd\te\n", encoding="utf-8")
    with pytest.raises(KGFormatError, match=r"bad.tsv:2:"):
        KnowledgeBase.build(bad, tmp_path / "kb", encoder=encoder)
    assert not (tmp_path / "kb").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tsv"]  # no temp build left behind
    kb = KnowledgeBase.build(bad, tmp_path / "kb", encoder=encoder, skip_bad=True)
    assert len(kb) == 1 and kb.manifest["history"][-1]["bad"] == 1
    before = (kb.path / "manifest.json").read_bytes()
    with pytest.raises(KGFormatError):
        kb.add(bad)
    assert (kb.path / "manifest.json").read_bytes() == before


def test_empty_and_missing(tmp_path, encoder):
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(KBError, match="no triples"):
        KnowledgeBase.build(empty, tmp_path / "kb", encoder=encoder)
    with pytest.raises(KBError, match="no KB directory"):
        KnowledgeBase.open(tmp_path / "nope")
    (tmp_path / "notkb").mkdir()
    with pytest.raises(KBError, match="manifest.json: missing"):
        KnowledgeBase.open(tmp_path / "notkb")
    with pytest.raises(KBError, match="every field"):
        KnowledgeBase.build([("a", "", "c")], tmp_path / "kb2", encoder=encoder)
    kb = KnowledgeBase.create(tmp_path / "kb3", encoder=encoder)
    assert len(kb) == 0 and kb.embeddings()[1].shape == (0, 384)
    assert kb.add([("a", "b", "c")]).added == 1


def test_overwrite_needs_permission_and_keeps_old_kb_until_done(small_kb, tmp_path, encoder):
    with pytest.raises(KBError, match="not empty"):
        KnowledgeBase.build(FACTS[:1], small_kb.path, encoder=encoder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"head": "x"}\n', encoding="utf-8")
    with pytest.raises(KGFormatError):
        KnowledgeBase.build(bad, small_kb.path, encoder=encoder, overwrite=True)
    assert len(KnowledgeBase.open(small_kb.path, verify=True)) == 4
    kb = KnowledgeBase.build(FACTS[:1], small_kb.path, encoder=encoder, overwrite=True)
    assert len(KnowledgeBase.open(kb.path, verify=True)) == 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "precious.txt").write_text("x")
    with pytest.raises(KBError, match="not a KB"):
        KnowledgeBase.build(FACTS, tmp_path / "plain", encoder=encoder, overwrite=True)


def test_corruption_is_detected_and_named(small_kb):
    seg = small_kb.manifest["segments"][0]
    keys = small_kb.path / seg["keys"]
    data = bytearray(keys.read_bytes())
    data[-3] ^= 0xFF
    keys.write_bytes(bytes(data))
    KnowledgeBase.open(small_kb.path)  # same size: the cheap open check cannot see it ...
    with pytest.raises(KBError, match=r"keys\.f16\.npy: checksum mismatch"):
        KnowledgeBase.open(small_kb.path, verify=True)  # ... verify does
    keys.write_bytes(bytes(data[:-100]))
    with pytest.raises(KBError, match=r"keys\.f16\.npy: .*truncated"):
        KnowledgeBase.open(small_kb.path)


def test_manifest_cannot_point_outside(small_kb):
    m = json.loads((small_kb.path / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (small_kb.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KBError, match="escapes the KB directory"):
        KnowledgeBase.open(small_kb.path)


def test_killed_add_leaves_previous_version(small_kb, tmp_path):
    """SIGKILL a writer mid-add: the KB still opens at its last committed version, orphans are ignored."""
    big = tmp_path / "more.tsv"
    big.write_text("".join(f"person {i}\tplace of birth\tcity {i % 50}\n" for i in range(20000)))
    code = ("import sys; from atlaskv.kb.store import KnowledgeBase; "
            "KnowledgeBase.open(sys.argv[1]).add(sys.argv[2])")
    p = subprocess.Popen([sys.executable, "-c", code, str(small_kb.path), str(big)])
    deadline = time.time() + 120
    seg_dir = small_kb.path / "segments"
    while time.time() < deadline and p.poll() is None:
        if len(list(seg_dir.iterdir())) > 3:  # the new segment has started to appear
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    kb = KnowledgeBase.open(small_kb.path, verify=True)
    if kb.version == 1:  # killed before the commit point
        assert len(kb) == 4 and set(kb.triples()) == {Triple(*f) for f in FACTS}
    else:  # the kill came after the manifest replace: then the whole add is there
        assert kb.version == 2 and len(kb) == 20004
    # the HiKVP tree of the surviving version covers exactly its entries (adds are placed in the same commit)
    assert np.array_equal(np.sort(kb.hierarchy().inter_children), kb.embeddings()[0])
    # the next writer cleans up what the killed one left
    kb.add([("x", "y", "z")])
    assert kb.verify()["orphans"] == []


def test_one_writer_at_a_time(small_kb):
    import fcntl

    with open(small_kb.path / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(KBError, match="another process is writing"):
            small_kb.add([("a", "b", "c")])


def test_demo_kg_builds(demo_facts, tmp_path, encoder):
    rep = read_triples(demo_facts)
    kb = KnowledgeBase.build(demo_facts, tmp_path / "demo", encoder=encoder)
    assert len(kb) == len(rep.triples) > 3000
    assert kb.bytes_on_disk() < 20 << 20


def test_adds_merge_their_small_segments_keeping_every_entry_id_tombstone_and_the_index(tmp_path, monkeypatch):
    """Each add writes a segment; the add that makes more than MERGE_AT small ones merges them into one and
    changes nothing else: the same live triples and embeddings under the same ids, removals still removed,
    the HiKVP index still names stored entries, and a snapshot taken before the merge still reads its
    records (its files are retired, not deleted, until RETIRED_SECONDS later)."""
    import hash_encoder  # noqa: F401  (registers the test encoder)
    import atlaskv.kb.store as store
    from atlaskv.kb.view import KBView

    monkeypatch.setattr(store, "SMALL_SEGMENT", 10)  # the build's segment (40 rows) is left alone

    base = [(f"Base {i}", "place of birth", f"City {i % 7}") for i in range(40)]
    kb = KnowledgeBase.build(base, tmp_path / "kb", encoder="test-hash-16", index=True)
    for i in range(store.MERGE_AT):
        kb.add([(f"Added {i}", "country", f"Land {i % 3}")])
    kb.remove([("Added 3", "country", "Land 0"), ("Base 5", "place of birth", "City 5")])
    before = KnowledgeBase.open(kb.path)
    ids, keys, values = before.embeddings()
    old_view = KBView.of(before)
    live_before = sorted(before.triples())
    assert len(before.manifest["segments"]) == store.MERGE_AT + 1  # not yet more than MERGE_AT small ones

    last = ("Added 16", "country", "Land 1")
    res = kb.add([last])  # the 17th small segment: this add merges them
    after = KnowledgeBase.open(kb.path, verify=True)
    assert len(after.manifest["segments"]) == 2 and after.version == res.version == before.version + 2
    assert [h["op"] for h in after.manifest["history"][-2:]] == ["add", "merge"]
    assert sorted(after.triples()) == sorted(live_before + [Triple(*last)]) and len(after) == len(before) + 1
    ids2, keys2, values2 = after.embeddings()
    n = len(ids)
    assert np.array_equal(ids2[:n], ids) and np.array_equal(keys2[:n], keys) and np.array_equal(values2[:n], values)
    leaves = before.hierarchy().inter_children  # the index names entry ids: all still stored, same rows
    assert np.isin(leaves, after.hierarchy().inter_children).all()
    assert np.array_equal(after.table().keys.take(after.table().positions(leaves)),
                          before.table().keys.take(before.table().positions(leaves)))
    assert after.verify()["orphans"] == []
    retired = list(after.manifest["retired"])
    assert len(retired) == 3 * (store.MERGE_AT + 1) and all((kb.path / r).is_file() for r in retired)
    assert old_view.triples(old_view.live_positions()[-3:])  # the old snapshot still reads its records
    assert KnowledgeBase.open(kb.path).merge_segments(keep=2).version == after.version  # nothing to merge

    monkeypatch.setattr(store, "RETIRED_SECONDS", 0)
    for i in range(store.MERGE_AT + 1):
        kb.add([(f"More {i}", "country", "Land 1")])
    now = KnowledgeBase.open(kb.path, verify=True)
    assert not any((kb.path / r).exists() for r in retired)  # expired: deleted at this merge
    assert len(now) == len(after) + store.MERGE_AT + 1 and len(now.manifest["segments"]) == 3  # 17 rows: not small


def test_merge_refuses_a_retired_path_outside_the_kb(tmp_path):
    import hash_encoder  # noqa: F401

    kb = KnowledgeBase.build([("a", "r", "1")], tmp_path / "kb", encoder="test-hash-16", index=False)
    kb.add([("b", "r", "2")])
    kb.add([("c", "r", "3")])
    m = json.loads((kb.path / "manifest.json").read_text())
    m["retired"] = {"../outside.txt": 0}
    (kb.path / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "outside.txt").write_text("keep me")
    with pytest.raises(KBError, match="retired file"):
        KnowledgeBase.open(kb.path).merge_segments(keep=1)
    assert (tmp_path / "outside.txt").read_text() == "keep me"


def test_fields_by_position_read_from_many_row_groups_and_not_from_a_replaced_file(small_kb):
    """EmbeddingTable.columns across row groups, positions repeated and out of order, through the shared
    cache of decoded row groups; a records file written anew is read anew."""
    import pyarrow.parquet as pq

    kb = KnowledgeBase.open(small_kb.path)
    rel = kb.manifest["segments"][0]["records"]
    records = kb.path / rel

    def rewrite(table, rows_per_group):  # and the manifest's size of the file, which open() checks
        pq.write_table(table, records, row_group_size=rows_per_group)
        manifest = json.loads((kb.path / "manifest.json").read_text())
        manifest["files"][rel]["bytes"] = records.stat().st_size
        (kb.path / "manifest.json").write_text(json.dumps(manifest))

    table = pq.read_table(records)
    rewrite(table, 1)  # 4 row groups of 1 row (a build writes 64Ki rows per group)
    assert pq.ParquetFile(records).num_row_groups == 4
    view = KnowledgeBase.open(small_kb.path).table()
    want = [3, 0, 3, 1, 2]
    assert view.triples(np.array(want)) == [Triple(*FACTS[i]) for i in want]
    assert view.value_texts(np.array([2, 2])) == ["London", "London"]
    table = table.set_column(table.schema.get_field_index("value_text"), "value_text",
                             pa.array(["a", "b", "c", "d"]))
    time.sleep(0.01)  # a new mtime even on coarse clocks
    rewrite(table, 2)
    assert KnowledgeBase.open(small_kb.path).table().value_texts(np.array([3, 0, 2])) == ["d", "a", "c"]


def test_an_add_gets_the_bits_a_build_gives_under_the_kbs_own_encoder_pass(tmp_path, encoder):
    """The shape of the encoder's exact passes is part of a KB: recorded at build, used by every add, so an
    added fact has the bits a build would give it, also in a KB built before the shape was recorded."""
    from atlaskv.kb.encoder import EXACT_PASS, LEGACY_EXACT_PASS, encode_records
    from atlaskv.kb.layout import write_manifest
    from atlaskv.kb.records import triples_to_records

    new = ("Grace Hopper", "place of birth", "New York City")
    kb = KnowledgeBase.build(FACTS, tmp_path / "kb", encoder=encoder)
    whole = KnowledgeBase.build(FACTS + [new], tmp_path / "whole", encoder=encoder)
    assert kb.manifest["encoder"]["exact_pass"] == list(EXACT_PASS) and kb.exact_pass == EXACT_PASS
    assert kb.info()["encoder_exact_pass"] == list(EXACT_PASS)
    kb.add([new])
    for a, b in zip(kb.embeddings(), whole.embeddings()):
        assert np.array_equal(a, b)

    legacy = KnowledgeBase.build(FACTS, tmp_path / "legacy", encoder=encoder)
    m = json.loads((legacy.path / "manifest.json").read_text())
    del m["encoder"]["exact_pass"]  # as written before the shape was recorded
    write_manifest(legacy.path, m)
    legacy = KnowledgeBase.open(legacy.path, verify=True)
    assert legacy.exact_pass == LEGACY_EXACT_PASS
    legacy.add([new])
    _, keys, values = legacy.embeddings()
    want = encode_records(encoder, triples_to_records([new], "tail"), exact_pass=LEGACY_EXACT_PASS)
    assert np.array_equal(keys[-1], want[0][0]) and np.array_equal(values[-1], want[1][0])


def test_a_manifest_with_a_bad_encoder_pass_is_named(small_kb):
    m = json.loads((small_kb.path / "manifest.json").read_text())
    m["encoder"]["exact_pass"] = [256]
    (small_kb.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KBError, match="exact_pass"):
        KnowledgeBase.open(small_kb.path)
