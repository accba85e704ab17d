"""kg.py: readers, writers and their error messages (file, line, reason), on fixtures and real data."""
import gzip
import os
import pickle
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlaskv.kb.triples import (FORMATS, MAX_FIELD_CHARS, EvalQuestion, KGFormatError, ReadReport, Triple, detect_format,
                        iter_triples, read_eval_set, read_triples, write_triples)

FIXTURES = Path(__file__).parent / "fixtures"
BAD, GOOD = FIXTURES / "bad", FIXTURES / "good"
WRITABLE = ("tsv", "csv", "jsonl", "parquet")


def shared_dir() -> Path | None:
    """../shared beside the checkout, else $ATLASKV_SHARED."""
    for p in (Path(__file__).resolve().parents[2] / "shared", os.environ.get("ATLASKV_SHARED")):
        if p and Path(p).is_dir():
            return Path(p)
    return None


def shared_path(relative: str) -> Path:
    root = shared_dir()
    path = root / relative if root else None
    if path is None or not path.exists():
        pytest.skip(f"real data not available: shared/{relative} "
                    "(put shared/ beside the checkout or set ATLASKV_SHARED)")
    return path


def norm(text: str) -> str:
    """The readers' field normalisation, restated independently."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("split, count", [("train", 272_115), ("valid", 17_535), ("test", 20_466)])
def test_fb15k237_splits(split, count):
    report = read_triples(shared_path(f"data/fb15k-237/{split}.txt"))
    assert len(report.triples) == report.n_rows == count
    assert report.n_duplicates == report.n_bad == 0
    assert report.triples[0].head.startswith("/m/")
    if split == "train":
        assert len({t.relation for t in report.triples}) == 237


@pytest.mark.parametrize("name, n_triples, n_questions", [
    ("fb15k", 5_887, 5_887), ("pararel", 26_483, 26_483), ("fb15k-dense", 40_844, 5_887),
])
def test_shared_eval_sets(name, n_triples, n_questions):
    triples, questions = read_eval_set(shared_path(f"eval/{name}"))
    assert (len(triples), len(questions)) == (n_triples, n_questions)
    assert all(isinstance(q, EvalQuestion) and q.question for q in questions)
    assert {q.triple for q in questions} <= set(triples)


# --------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("name, expected", [
    ("with_header.tsv", [("Paris", "capital of", "France"), ("New York", "population", "8 million")]),
    ("bom_crlf.tsv", [("/m/027rn", "/location/country/form_of_government", "/m/06cx9"),
                      ("/m/017dcd", "/tv/tv_program/regular_cast", "/m/06v8s0")]),
    ("quoted.csv", [("Washington, D.C.", "capital of", "United States"),
                    ("The Hobbit", "author", "J. R. R. Tolkien"),
                    ('He said "hi"', "quoted by", "Alice"),
                    ("Two lines", "note", "x")]),
    ("triples.jsonl", [("Paris", "capital of", "France"), ("Marie Curie", "field", "physics"),
                       ("Zürich", "country", "Switzerland")]),
    # labels win over IRIs (English, else untagged), camelCase predicates become words,
    # label triples are not facts, literals keep their lexical form, blank nodes keep their file label
    ("labels.nt", [("Paris", "place of birth", "France"), ("New York City", "population", "8336817"),
                   ("b1", "has ISBN", "978-0-261-10221-7")]),
    ("prefixes.ttl", [("Paris", "capital of", "France"), ("Marie Curie", "birth date", "1867-11-07"),
                      ("Marie Curie", "field of work", "Physics")]),
])
def test_good_fixtures(name, expected):
    report = read_triples(GOOD / name)
    assert report.triples == [Triple(*t) for t in expected]
    assert report.n_rows == len(expected) and report.n_bad == 0
    assert list(iter_triples(GOOD / name)) == report.triples


def test_format_can_be_forced(tmp_path):
    path = tmp_path / "facts.data"
    path.write_text('{"head": "a", "relation": "b", "tail": "c"}\n')
    assert read_triples(path, "jsonl").triples == [Triple("a", "b", "c")]
    assert read_triples(path, "ndjson").triples == [Triple("a", "b", "c")]


# --------------------------------------------------------------------------------------------- bad files

# name, line (None: whole file), reason, heads that come back with skip_bad (None: skip_bad cannot help)
BAD_CASES = [
    ("wrong_columns.tsv", 2, "expected 3 tab-separated columns (head, relation, tail), found 2", ["Paris", "Rome"]),
    ("two_columns.csv", 3, "expected 3 comma-separated columns (head, relation, tail), found 2", ["Paris", "Rome"]),
    ("empty_field.tsv", 3, "empty relation", ["Paris", "Berlin"]),
    ("invalid_utf8.tsv", 2, "invalid UTF-8 at byte offset 28", ["Paris", "Rome"]),
    ("invalid_utf8.jsonl", 2, "invalid UTF-8 at byte offset", ["Paris"]),
    ("nul.tsv", 2, "NUL byte in relation", ["Paris"]),
    ("not_object.jsonl", 2, "expected a JSON object, found list", ["Paris"]),
    ("missing_key.jsonl", 3, "missing key 'tail'", ["Paris"]),
    ("syntax.nt", 3, "invalid N-Triples", ["Paris", "Rome"]),
    ("null_tail.parquet", 2, "null tail", ["Paris", "Rome"]),
    ("syntax.ttl", 5, "invalid Turtle", None),
    ("missing_column.parquet", None, "missing column tail", None),
    ("truncated.parquet", None, "not a readable Parquet file", None),
    ("unknown.xyz", None, "unknown file extension", None),
]


@pytest.mark.parametrize("name, line, reason, kept", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_fixtures(name, line, reason, kept):
    path = BAD / name
    with pytest.raises(KGFormatError) as info:
        read_triples([GOOD / "with_header.tsv", path])
    err = info.value
    assert err.path == str(path) and err.line == line and reason in err.reason
    assert str(err).startswith(f"{path}:{line}: " if line else f"{path}: ") and name in str(err)

    if kept is None:
        with pytest.raises(KGFormatError):
            read_triples(path, skip_bad=True)
        return
    report = read_triples(path, skip_bad=True)
    assert [t.head for t in report.triples] == kept
    assert report.n_bad == 1 and report.n_rows == len(kept) + 1
    assert [str(e) for e in report.errors] == [str(err)]


def test_unknown_extension_lists_formats():
    with pytest.raises(KGFormatError) as info:
        detect_format("data.xyz")
    assert all(f in info.value.reason for f in FORMATS)


def test_iter_triples_streams_then_raises_at_the_bad_row():
    rows = iter_triples(BAD / "wrong_columns.tsv")
    assert next(rows) == Triple("Paris", "capital of", "France")
    with pytest.raises(KGFormatError, match=r"wrong_columns\.tsv:2: expected 3"):
        next(rows)
    seen = []
    assert [t.head for t in iter_triples(BAD / "wrong_columns.tsv", skip_bad=True, on_bad=seen.append)] == \
        ["Paris", "Rome"]
    assert [e.line for e in seen] == [2]


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_missing_file_or_directory(tmp_path, make):
    path = tmp_path / "facts.tsv"
    if make == "directory":
        path.mkdir()
    expected = "no such file" if make == "missing" else "is a directory"
    calls = (lambda: read_triples(path), lambda: iter_triples(path), lambda: read_triples([GOOD / "quoted.csv", path]))
    for call in calls:
        with pytest.raises(KGFormatError, match=expected) as info:
            call()
        assert info.value.path == str(path) and info.value.line is None


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_field_over_the_limit(tmp_path, fmt):
    huge = "x" * 1_000_000
    path = tmp_path / f"big.{fmt}"
    write_triples([("a", "b", "c"), ("a", "b", huge)], path)
    line = {"csv": 3}.get(fmt, 2)  # csv has a header line
    with pytest.raises(KGFormatError) as info:
        read_triples(path)
    assert info.value.line == line
    assert info.value.reason == f"tail is 1000000 characters, over the limit of {MAX_FIELD_CHARS}"
    assert read_triples(path, max_field_chars=2_000_000).triples[1].tail == huge


def test_skip_bad_counts_and_keeps_at_most_100_errors(tmp_path):
    path = tmp_path / "many.tsv"
    path.write_text("head\trelation\ttail\n" + "a\tb\tc\n" + "bad line\n" * 150 + "d\te\tf\n")
    report = read_triples(path, skip_bad=True)
    assert report.triples == [Triple("a", "b", "c"), Triple("d", "e", "f")]
    assert (report.n_rows, report.n_bad, len(report.errors)) == (152, 150, 100)
    assert report.errors[0].line == 3 and report.errors[-1].line == 102


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "facts.tsv.gz"
    data = gzip.compress(os.urandom(3000).hex().encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KGFormatError, match="cannot read") as info:
        read_triples(path)
    assert info.value.path == str(path)


def test_error_message_and_pickling():
    err = KGFormatError(Path("dir/f.tsv"), 7, "empty head")
    assert str(err) == "dir/f.tsv:7: empty head" and isinstance(err, ValueError)
    assert str(KGFormatError("f.nt", None, "bad")) == "f.nt: bad"
    copy = pickle.loads(pickle.dumps(err))  # crosses process boundaries (Ray workers)
    assert (copy.path, copy.line, copy.reason, str(copy)) == ("dir/f.tsv", 7, "empty head", str(err))


@pytest.mark.parametrize("name, fmt", [
    ("a.tsv", "tsv"), ("train.txt", "tsv"), ("A.CSV", "csv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"),
    ("a.nt", "nt"), ("a.ttl", "ttl"), ("a.turtle", "ttl"), ("a.parquet", "parquet"), ("a.pq", "parquet"),
    ("a.tsv.gz", "tsv"), ("dump.nt.gz", "nt"), ("v1.2.jsonl.gz", "jsonl"),
])
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name, forced", [("a.gz", None), ("a.parquet.gz", None), ("noext", None), ("a.tsv", "xml")])
def test_detect_format_rejects(name, forced):
    with pytest.raises(KGFormatError, match=name.replace(".", r"\.")):
        detect_format(name, forced)


# --------------------------------------------------------------------------------------------- eval sets


def make_eval_set(folder: Path, triples: str, questions: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "triples.tsv").write_text(triples)
    (folder / "questions.jsonl").write_text(questions)
    return folder


def test_eval_set_reads_and_checks_gold_triples(tmp_path):
    triples = "Paris\tcapital of\tFrance\nRome\tcapital of\tItaly\n"
    ok = '{"question": "What is Paris the capital of?", "head": "Paris", "relation": "capital of", "tail": "France"}\n'
    got_triples, questions = read_eval_set(make_eval_set(tmp_path / "ok", triples, ok))
    assert got_triples == [Triple("Paris", "capital of", "France"), Triple("Rome", "capital of", "Italy")]
    assert questions == [EvalQuestion("What is Paris the capital of?", "Paris", "capital of", "France")]
    assert questions[0].triple == got_triples[0]

    wrong_gold = ok + ok.replace("France", "Spain")
    with pytest.raises(KGFormatError) as info:
        read_eval_set(make_eval_set(tmp_path / "gold", triples, wrong_gold))
    assert info.value.path.endswith("questions.jsonl") and info.value.line == 2
    assert "not a line of triples.tsv" in info.value.reason


@pytest.mark.parametrize("triples, questions, file, line, reason", [
    ("a\tb\n", "", "triples.tsv", 1, "expected 3 tab-separated columns"),
    ("a\tb\tc\n", '{"question": "q?", "head": "a", "relation": "b"}\n', "questions.jsonl", 1, "missing key 'tail'"),
    ("a\tb\tc\n", '\n{"question": "", "head": "a", "relation": "b", "tail": "c"}\n', "questions.jsonl", 2,
     "empty question"),
    ("a\tb\tc\n", '{"question": 3, "head": "a", "relation": "b", "tail": "c"}\n', "questions.jsonl", 1,
     "'question' must be a string"),
    ("a\tb\tc\n", "not json\n", "questions.jsonl", 1, "invalid JSON"),
])
def test_eval_set_errors(tmp_path, triples, questions, file, line, reason):
    with pytest.raises(KGFormatError) as info:
        read_eval_set(make_eval_set(tmp_path / "set", triples, questions))
    assert Path(info.value.path).name == file and info.value.line == line and reason in info.value.reason


def test_eval_set_has_no_header(tmp_path):
    folder = make_eval_set(tmp_path / "set", "head\trelation\ttail\n",
                           '{"question": "q", "head": "head", "relation": "relation", "tail": "tail"}\n')
    assert read_eval_set(folder)[0] == [Triple("head", "relation", "tail")]
    with pytest.raises(KGFormatError, match="no such folder"):
        read_eval_set(tmp_path / "nope")
    (folder / "questions.jsonl").unlink()
    with pytest.raises(KGFormatError, match=r"questions\.jsonl: no such file"):
        read_eval_set(folder)


# --------------------------------------------------------------------------------------------- writing


SAMPLE = [Triple("Paris", "capital of", "France"), ("Washington, D.C.", "capital of", "United States"),
          ("He said \"hi\"", "quote", "{'a': 1}"), ("Zürich", "country", "Switzerland")]


@pytest.mark.parametrize("suffix", ["tsv", "csv", "jsonl", "parquet", "tsv.gz", "csv.gz", "jsonl.gz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"out.{suffix}"
    assert write_triples(iter(SAMPLE), path) == len(SAMPLE)
    assert read_triples(path).triples == [Triple(*t) for t in SAMPLE]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_tsv_writes_a_header_only_when_the_first_triple_looks_like_one(tmp_path):
    plain, tricky = tmp_path / "plain.tsv", tmp_path / "tricky.tsv"
    write_triples(SAMPLE, plain)
    assert plain.read_text().startswith("Paris\t")  # eval-set contract: no header
    write_triples([("Head", "relation", "tail"), ("a", "b", "c")], tricky)
    assert read_triples(tricky).triples == [Triple("Head", "relation", "tail"), Triple("a", "b", "c")]


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.tsv"
    write_triples(SAMPLE, path)
    before = path.read_bytes()
    for bad in ([("a", "b", "c"), ("a", " ", "c")], [("a", "b")], [("a", "b", 3)]):
        with pytest.raises(ValueError, match="triple 2|triple 1"):
            write_triples(bad, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.tsv"]


def test_write_rejects_rdf(tmp_path):
    with pytest.raises(KGFormatError, match="cannot write nt"):
        write_triples(SAMPLE, tmp_path / "out.nt")
    assert not list(tmp_path.iterdir())


def test_a_head_starting_with_a_byte_order_mark_survives_tsv(tmp_path):
    """Readers strip a BOM at the start of a file; a first head that starts with U+FEFF keeps it (found by
    test_write_read_round_trip_property)."""
    triples = [Triple("\ufeff", "0", "0"), Triple("\ufeffx", "r", "y")]
    for name in ("t.tsv", "t.tsv.gz"):
        write_triples(triples, tmp_path / name)
        assert read_triples(tmp_path / name).triples == triples


def test_duplicates_dropped_across_files(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.jsonl"
    a.write_text("x\tr\ty\nx\tr\ty\nz\tr\ty\n")
    write_triples([("x", "r", "y"), ("new", "r", "y"), ("z", "r ", " y")], b)
    report = read_triples([a, str(b)])
    assert report.triples == [Triple("x", "r", "y"), Triple("z", "r", "y"), Triple("new", "r", "y")]
    assert (report.n_rows, report.n_duplicates) == (6, 3)


# --------------------------------------------------------------------------------------------- properties

field_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).map(norm).filter(bool)
triple_lists = st.lists(st.tuples(field_text, field_text, field_text), max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(triples=triple_lists)
def test_write_read_round_trip_property(triples):
    expected = list(dict.fromkeys(Triple(*t) for t in triples))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in WRITABLE:
            path = Path(tmp, f"t.{fmt}")
            write_triples(triples, path)
            assert read_triples(path).triples == expected, fmt


# Arbitrary bytes, biased towards the characters that matter to the parsers.
fragments = st.sampled_from([b"\t", b"\n", b"\r\n", b",", b'"', b"{", b"}", b":", b"[", b"\x00", b"\xff", b"\xc3",
                             b"\xef\xbb\xbf", b"head", b'"head"', b'"tail"', b'"relation"', b"a b", b" ", b"1e999"])
messy_bytes = st.one_of(st.binary(max_size=200), st.lists(fragments, max_size=40).map(b"".join))


@settings(max_examples=150, deadline=None)
@given(data=messy_bytes, fmt=st.sampled_from(["tsv", "csv", "jsonl"]), skip_bad=st.booleans())
def test_readers_only_raise_kgformaterror(data, fmt, skip_bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"fuzz.{fmt}")
        path.write_bytes(data)
        try:
            report = read_triples(path, skip_bad=skip_bad)
        except KGFormatError as e:
            # with skip_bad only a file-level problem (a broken gzip stream) may still stop the read
            assert e.path == str(path) and (not skip_bad or "cannot read" in e.reason)
        else:
            assert isinstance(report, ReadReport)
            assert all(len(t) == 3 and all(f and f == norm(f) for f in t) for t in report.triples)
            assert report.n_rows == len(report.triples) + report.n_bad + report.n_duplicates
