"""The FB15k-237 relation-phrase table and the bundled demo KG (standard library only).

Checks against the raw FB15k-237 files and the eval sets run when the shared data folder exists
(``$ATLASKV_SHARED`` or ``<repo>/../shared``); they are skipped otherwise.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "src" / "atlaskv" / "data" / "fb15k237_relations.tsv"
DEMO = REPO / "examples" / "demo"
SHARED = Path(os.environ.get("ATLASKV_SHARED") or Path(__file__).resolve().parents[2] / "shared")
FB = SHARED / "data" / "fb15k-237"
EVAL = SHARED / "eval"

needs_shared = pytest.mark.skipif(
    not (FB / "train.txt").is_file() or not (EVAL / "fb15k" / "triples.tsv").is_file(),
    reason=f"FB15k-237 data / eval sets not found under {SHARED} (set ATLASKV_SHARED to the shared folder)",
)


# --------------------------------------------------------------------------------------------- loaders
@lru_cache(maxsize=None)
def table_rows() -> tuple[dict[str, str], ...]:
    with open(TABLE, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert reader.fieldnames == ["relation_path", "phrase", "inverse_phrase", "source"]
        return tuple(reader)


def table() -> dict[str, dict[str, str]]:
    return {row["relation_path"]: row for row in table_rows()}


def normalize_name(name: str) -> str:
    name = re.sub(r"\s+", " ", name).strip()
    return name[:-3].rstrip() if name.endswith("-GB") else name


@lru_cache(maxsize=None)
def fb_names() -> dict[str, str]:
    with open(FB / "entity2text.txt", encoding="utf-8") as f:
        return dict((m, normalize_name(n)) for m, n in (ln.rstrip("\r\n").split("\t", 1) for ln in f))


@lru_cache(maxsize=None)
def fb_split(split: str) -> tuple[tuple[str, str, str], ...]:
    with open(FB / f"{split}.txt", encoding="utf-8") as f:  # text mode drops the CRLF's \r
        return tuple(tuple(ln.rstrip("\r\n").split("\t")) for ln in f if ln.strip())


def read_tsv(path: Path) -> list[tuple[str, ...]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [tuple(ln.rstrip("\n").split("\t")) for ln in f if ln.rstrip("\n")]


@lru_cache(maxsize=None)
def demo_facts() -> tuple[tuple[str, ...], ...]:
    return tuple(read_tsv(DEMO / "facts.tsv"))


# --------------------------------------------------------------------------------------------- table
def test_table_has_237_unique_paths():
    rows = table_rows()
    paths = [r["relation_path"] for r in rows]
    assert len(paths) == 237
    assert len(set(paths)) == 237
    assert all(p.startswith("/") for p in paths)
    assert {r["source"] for r in rows} == {"eval", "manual"}
    assert sum(r["source"] == "eval" for r in rows) == 84


def test_phrases_are_readable():
    for row in table_rows():
        for col in ("phrase", "inverse_phrase"):
            text = row[col]
            if col == "inverse_phrase" and not text:
                continue
            assert text, f"empty {col} for {row['relation_path']}"
            assert text == text.strip() and "  " not in text, (row["relation_path"], text)
            assert "/" not in text and "_" not in text, (row["relation_path"], text)
            assert not re.search(r"[\t\n\r.]", text), (row["relation_path"], text)


def test_spot_checks():
    t = table()
    assert t["/people/person/place_of_birth"]["phrase"] == "place of birth"
    assert t["/people/person/nationality"]["phrase"] == "nationality"
    spouse = t["/people/person/spouse_s./people/marriage/spouse"]
    assert spouse["phrase"] == "spouse" and spouse["inverse_phrase"] == "spouse"
    assert t["/people/deceased_person/place_of_death"]["phrase"] == "place of death"
    assert t["/location/location/time_zones"]["phrase"] == "time zone"
    assert t["/film/film/prequel"]["inverse_phrase"] == "sequel"
    assert t["/film/film/genre"]["phrase"] == "genre"
    assert t["/people/person/profession"]["phrase"] == "profession"
    assert t["/film/actor/film./film/performance/film"]["phrase"] == "film"
    assert t["/award/award_winner/awards_won./award/award_honor/award_winner"]["phrase"] == "fellow award winner"
    assert t["/organization/organization/headquarters./location/mailing_address/citytown"]["phrase"] == \
        "headquarters city"


@needs_shared
def test_table_covers_every_fb15k_relation():
    used = {r for split in ("train", "valid", "test") for _, r, _ in fb_split(split)}
    assert used == set(table())


@needs_shared
def test_eval_relations_match_eval_phrases():
    """Recover (Freebase path -> phrase) from the eval sets via entity names; it must equal the table's eval rows."""
    names = fb_names()
    pair_paths = collections.defaultdict(set)
    for split in ("train", "valid", "test"):
        for h, r, t in fb_split(split):
            pair_paths[(names[h], names[t])].add(r)
    eval_triples = set()
    for name in ("fb15k", "fb15k-dense"):
        eval_triples.update(read_tsv(EVAL / name / "triples.tsv"))
    votes = collections.defaultdict(collections.Counter)
    for h, phrase, t in eval_triples:
        cands = pair_paths[(h, t)]
        assert cands, f"eval triple with no FB15k-237 counterpart: {(h, phrase, t)}"
        if len(cands) == 1:
            votes[next(iter(cands))][phrase] += 1
    recovered = {}
    for path, counter in votes.items():
        assert len(counter) == 1, f"eval phrase of {path} is ambiguous: {dict(counter)}"
        recovered[path] = next(iter(counter))

    t = table()
    eval_rows = {p: row["phrase"] for p, row in t.items() if row["source"] == "eval"}
    assert recovered == eval_rows
    assert len(eval_rows) == 84 and len(set(eval_rows.values())) == 78
    # every eval triple is explained by some path with the table's phrase
    for h, phrase, t_ in eval_triples:
        assert any(t[r]["phrase"] == phrase for r in pair_paths[(h, t_)]), (h, phrase, t_)


# --------------------------------------------------------------------------------------------- demo KG
def test_demo_facts_shape():
    path = DEMO / "facts.tsv"
    assert path.stat().st_size <= 5 * 1024 * 1024
    facts = demo_facts()
    assert 3000 <= len(facts) <= 5000
    assert all(len(f) == 3 and all(f) for f in facts)
    assert all(x == x.strip() and "  " not in x and "\r" not in x for f in facts for x in f)
    assert len(set(facts)) == len(facts), "duplicate triples"
    keys = collections.Counter((h.casefold(), r) for h, r, _ in facts)
    assert max(keys.values()) == 1, "a (head, relation) key has several tails"
    assert not any(x.endswith("-GB") for f in facts for x in (f[0], f[2]))


def test_demo_relations_are_table_phrases():
    phrases = {row["phrase"] for row in table_rows()}
    used = {r for _, r, _ in demo_facts()}
    assert used <= phrases, sorted(used - phrases)
    assert len(used) >= 20


def test_demo_questions_are_in_facts():
    facts = set(demo_facts())
    with open(DEMO / "questions.jsonl", encoding="utf-8") as f:
        questions = [json.loads(ln) for ln in f if ln.strip()]
    assert 8 <= len(questions) <= 10
    for q in questions:
        assert set(q) == {"question", "head", "relation", "tail"}
        assert (q["head"], q["relation"], q["tail"]) in facts, q
        assert q["question"] == f"What is the {q['relation']} of {q['head']}?"


@needs_shared
def test_demo_has_no_held_out_facts():
    facts = set(demo_facts())
    for name in ("fb15k", "fb15k-dense"):
        questions = {tuple(json.loads(ln)[k] for k in ("head", "relation", "tail"))
                     for ln in (EVAL / name / "questions.jsonl").read_text(encoding="utf-8").splitlines()
                     if ln.strip()}
        assert not facts & questions, f"demo contains {name} question triples"
    assert not facts & set(read_tsv(EVAL / "fb15k" / "triples.tsv"))
    # valid/test triples, in readable form (names + table phrases)
    names, t = fb_names(), table()
    held_out = {(names[h], t[r]["phrase"], names[tl]) for s in ("valid", "test") for h, r, tl in fb_split(s)}
    assert not facts & held_out


@needs_shared
def test_demo_facts_come_from_train():
    names, t = fb_names(), table()
    train = {(names[h], t[r]["phrase"], names[tl]) for h, r, tl in fb_split("train")}
    missing = set(demo_facts()) - train
    assert not missing, sorted(missing)[:5]
