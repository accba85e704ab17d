#!/usr/bin/env python3
"""Build the bundled demo knowledge graph ``examples/demo/facts.tsv`` (+ ``examples/demo/questions.jsonl``).

A few thousand real FB15k-237 facts with readable names, as ``head<TAB>relation<TAB>tail`` (no header), where
``relation`` is the phrase of ``src/atlaskv/data/fb15k237_relations.tsv`` (so a fact reads
"the <relation> of <head>" -> "<tail>").

Selection (deterministic; a fixed seed only breaks ties):

* TRAIN split only: valid/test are the held-out evaluation data (``shared/eval/fb15k*``). Facts whose readable
  form (head name, phrase, tail name) also arises from a valid/test triple are dropped too.
* Single-tail keys only: the Freebase (head, relation) has exactly one tail in the whole graph
  (train + valid + test), and the readable key (head name, phrase), compared case-insensitively, has one tail
  over the whole graph as well. Heads whose name is shared by several entities are skipped.
* Relations with clear phrases (``DEMO_RELATIONS``), grouped by the kind of head (people, places, films,
  TV programs, organizations, music). Per group, heads with the most such facts come first, then the
  best-connected entities (facts in the whole graph); all of a head's facts are taken together, so the demo
  holds small profiles (a person's birthplace, nationality, spouse, ...).
* Coherent clusters: places that are the birthplace / place of death / residence of a chosen person, and the
  prequels of chosen films, are preferred within their group, so two-hop questions work
  ("the place of birth of X" -> Y, "the time zone of Y" -> Z).
* No self-loops (e.g. "the capital of Paris" -> Paris, a French department named after its capital).
* Names: ``entity2text.txt`` with the eval-set normalisation (trailing "-GB" removed, whitespace collapsed).

Run from the repository root (after ``scripts/make_fb15k_relations.py``)::

    .venv/bin/python scripts/make_demo_kg.py
"""

from __future__ import annotations

import collections
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fb15k_relations import REPO, load_names, normalize_name, shared_dir  # noqa: E402,F401

TABLE = REPO / "src" / "atlaskv" / "data" / "fb15k237_relations.tsv"
OUT_DIR = REPO / "examples" / "demo"
SEED = 20150701
TARGET = 4000  # facts; the result must stay within 3,000-5,000

# group -> number of facts to take
QUOTAS = {"people": 1700, "places": 800, "films": 850, "tv": 150, "orgs": 400, "music": 100}

# path -> (group, per-relation cap). Only relations whose phrase reads clearly in "the <phrase> of <head>".
DEMO_RELATIONS: dict[str, tuple[str, int]] = {
    # people
    "/people/person/place_of_birth": ("people", 500),
    "/people/person/nationality": ("people", 450),
    "/people/person/gender": ("people", 150),
    "/people/person/spouse_s./people/marriage/spouse": ("people", 200),
    "/people/person/sibling_s./people/sibling_relationship/sibling": ("people", 100),
    "/people/deceased_person/place_of_death": ("people", 250),
    "/people/deceased_person/place_of_burial": ("people", 100),
    "/people/person/religion": ("people", 150),
    "/people/person/places_lived./people/place_lived/location": ("people", 250),
    "/people/person/profession": ("people", 200),
    "/people/person/languages": ("people", 100),
    "/people/person/employment_history./business/employment_tenure/company": ("people", 100),
    "/music/artist/origin": ("people", 100),
    "/music/group_member/membership./music/group_membership/group": ("people", 100),
    "/music/artist/track_contributions./music/track_contribution/role": ("people", 80),
    "/organization/organization_founder/organizations_founded": ("people", 60),
    "/government/politician/government_positions_held./government/government_position_held/basic_title":
        ("people", 40),
    "/influence/influence_node/influenced_by": ("people", 80),
    # places
    "/location/location/time_zones": ("places", 350),
    "/base/biblioness/bibs_location/country": ("places", 250),
    "/base/biblioness/bibs_location/state": ("places", 200),
    "/location/hud_county_place/county": ("places", 200),
    "/location/administrative_division/country": ("places", 100),
    "/location/country/capital": ("places", 80),
    "/location/country/official_language": ("places", 80),
    "/location/country/form_of_government": ("places", 60),
    "/location/us_county/county_seat": ("places", 100),
    "/base/aareas/schema/administrative_area/capital": ("places", 60),
    # films
    "/film/film/language": ("films", 200),
    "/film/film/country": ("films", 200),
    "/film/film/music": ("films", 150),
    "/film/film/produced_by": ("films", 120),
    "/film/film/written_by": ("films", 120),
    "/film/film/story_by": ("films", 80),
    "/film/film/cinematography": ("films", 100),
    "/film/film/edited_by": ("films", 80),
    "/film/film/prequel": ("films", 100),
    "/film/film/genre": ("films", 60),
    "/film/film/production_companies": ("films", 120),
    "/film/film/costume_design_by": ("films", 60),
    "/film/film/film_production_design_by": ("films", 60),
    "/film/film/featured_film_locations": ("films", 80),
    # TV programs
    "/tv/tv_program/country_of_origin": ("tv", 60),
    "/tv/tv_program/languages": ("tv", 60),
    "/tv/tv_program/program_creator": ("tv", 40),
    "/tv/tv_program/genre": ("tv", 40),
    "/tv/tv_program/regular_cast./tv/regular_tv_appearance/actor": ("tv", 30),
    # organizations
    "/organization/organization/headquarters./location/mailing_address/citytown": ("orgs", 150),
    "/organization/organization/headquarters./location/mailing_address/state_province_region": ("orgs", 120),
    "/organization/organization/headquarters./location/mailing_address/country": ("orgs", 80),
    "/organization/organization/place_founded": ("orgs", 60),
    "/business/business_operation/industry": ("orgs", 80),
    "/sports/sports_team/sport": ("orgs", 80),
    "/education/educational_institution/school_type": ("orgs", 60),
    # music
    "/music/genre/parent_genre": ("music", 60),
    "/music/instrument/family": ("music", 40),
}
# relations whose tails are places worth describing too (two-hop questions)
PLACE_LINKS = {
    "/people/person/place_of_birth",
    "/people/deceased_person/place_of_death",
    "/people/person/places_lived./people/place_lived/location",
    "/organization/organization/headquarters./location/mailing_address/citytown",
}

# Demo questions: (head, phrase); the answer is looked up in the demo facts (the script fails if absent).
QUESTIONS = [
    ("Elvis Presley", "place of death"),
    ("Memphis", "time zone"),  # two hops: where Elvis died -> its time zone
    ("Michael Jackson", "place of birth"),
    ("John F. Kennedy", "place of burial"),
    ("Robert F. Kennedy", "sibling"),
    ("Humphrey Bogart", "spouse"),
    ("Jurassic Park", "music composer"),
    ("The Godfather Part II", "prequel"),
    ("Intel Corporation", "headquarters city"),
    ("Canada", "capital"),
]


def read_table() -> dict[str, str]:
    phrases = {}
    with open(TABLE, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[:2] == ["relation_path", "phrase"], header
        for line in f:
            path, phrase, _inverse, _source = line.rstrip("\n").split("\t")
            phrases[path] = phrase
    return phrases


def load_splits(data: Path) -> dict[str, list[tuple[str, str, str]]]:
    splits = {}
    for split in ("train", "valid", "test"):
        rows = []
        with open(data / f"{split}.txt", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line:
                    rows.append(tuple(line.split("\t")))
        splits[split] = rows
    return splits


def main() -> None:
    data = shared_dir() / "data" / "fb15k-237"
    if not data.is_dir():
        raise SystemExit(f"FB15k-237 data not found under {data.parent.parent} (set ATLASKV_SHARED)")
    phrases = read_table()
    names = load_names(data)
    splits = load_splits(data)
    everything = [t for rows in splits.values() for t in rows]

    # single-tail Freebase keys, readable-key tails, entity degree, shared names
    tails_by_key = collections.Counter((h, r) for h, r, _ in everything)
    readable_tails: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for h, r, t in everything:
        readable_tails[(names[h].casefold(), phrases[r])].add(names[t].casefold())
    held_out = {(names[h], phrases[r], names[t]) for s in ("valid", "test") for h, r, t in splits[s]}
    degree = collections.Counter()
    for h, _, t in everything:
        degree[h] += 1
        degree[t] += 1
    mids_by_name = collections.defaultdict(set)
    for mid in degree:
        mids_by_name[names[mid]].add(mid)

    pool: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)  # head -> train facts (MIDs)
    for h, r, t in splits["train"]:
        if r not in DEMO_RELATIONS or tails_by_key[(h, r)] != 1:
            continue
        hn, tn, p = names[h], names[t], phrases[r]
        if not hn or not tn or hn.casefold() == tn.casefold() or len(mids_by_name[hn]) != 1:
            continue
        if len(readable_tails[(hn.casefold(), p)]) != 1 or (hn, p, tn) in held_out:
            continue
        pool[h].append((h, r, t))

    def group_of(head: str) -> str:
        c = collections.Counter(DEMO_RELATIONS[r][0] for _, r, _ in pool[head])
        return max(sorted(c), key=lambda g: c[g])

    rng = random.Random(SEED)
    heads = sorted(pool)
    rng.shuffle(heads)  # tie-break only
    by_group: dict[str, list[str]] = collections.defaultdict(list)
    for h in heads:
        by_group[group_of(h)].append(h)

    chosen: list[tuple[str, str, str]] = []
    per_rel = collections.Counter()
    linked: set[str] = set()  # entities referenced by chosen facts (preferred in later groups)
    question_heads = {q[0] for q in QUESTIONS}

    def take(head: str, budget: int) -> int:
        n = 0
        for h, r, t in sorted(pool[head], key=lambda x: x[1]):
            if per_rel[r] >= DEMO_RELATIONS[r][1] and names[h] not in question_heads:
                continue
            chosen.append((h, r, t))
            per_rel[r] += 1
            n += 1
            if r in PLACE_LINKS or r == "/film/film/prequel":
                linked.add(t)
        return n

    for group in ("people", "films", "orgs", "places", "tv", "music"):  # places after people/orgs: linked places
        quota = QUOTAS[group]
        members = by_group[group]
        members.sort(key=lambda h: (names[h] not in question_heads, h not in linked,
                                    -min(len(pool[h]), 6), -degree[h]))
        got = 0
        for h in members:
            if got >= quota:
                break
            if len(pool[h]) < 2 and group != "music" and names[h] not in question_heads and h not in linked:
                continue  # prefer heads with a small profile
            got += take(h, quota - got)

    # two Freebase paths may share a phrase (e.g. both "country" paths of a US state): keep one readable triple
    rows = sorted({(names[h], phrases[r], names[t]) for h, r, t in chosen}, key=lambda x: (x[0].casefold(), x))
    for row in rows:
        assert all(row) and not any(c in f for f in row for c in "\t\r\n"), row
    if not 3000 <= len(rows) <= 5000:
        raise SystemExit(f"demo KG has {len(rows)} facts, outside 3,000-5,000: adjust QUOTAS")

    lookup = {(h, p): t for h, p, t in rows}
    questions = []
    for head, phrase in QUESTIONS:
        if (head, phrase) not in lookup:
            raise SystemExit(f"demo question without answer in the demo KG: {head!r} / {phrase!r}")
        questions.append({"question": f"What is the {phrase} of {head}?", "head": head,
                          "relation": phrase, "tail": lookup[(head, phrase)]})

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "facts.tsv", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write("\t".join(row) + "\n")
    with open(OUT_DIR / "questions.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")

    rel_counts = collections.Counter(p for _, p, _ in rows)
    n_heads = len({h for h, _, _ in rows})
    print(f"pool: {sum(map(len, pool.values()))} eligible train facts about {len(pool)} heads")
    print(f"wrote examples/demo/facts.tsv: {len(rows)} facts, {n_heads} heads, {len(rel_counts)} relation phrases")
    for p, n in rel_counts.most_common():
        print(f"  {n:5d}  {p}")
    print(f"wrote examples/demo/questions.jsonl: {len(questions)} questions")
    for q in questions:
        print(f"  {q['question']} -> {q['tail']}")


if __name__ == "__main__":
    main()
