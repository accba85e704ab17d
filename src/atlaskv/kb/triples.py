"""Knowledge-graph triples: read and write them, and say exactly where and why a file is bad.

Every reader yields rows in file order; a bad row becomes a `KGFormatError` naming file, line and
reason. Without ``skip_bad`` the first one is raised before the caller has done anything with the
data, which is what lets the CLI promise that a failed build writes nothing.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
import secrets
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, NamedTuple
from urllib.parse import unquote

__all__ = [
    "FORMATS",
    "MAX_FIELD_CHARS",
    "EvalQuestion",
    "KGFormatError",
    "ReadReport",
    "Triple",
    "detect_format",
    "iter_triples",
    "read_eval_set",
    "read_triples",
    "write_triples",
]

FORMATS = ("tsv", "csv", "jsonl", "nt", "ttl", "parquet")
WRITABLE_FORMATS = ("tsv", "csv", "jsonl", "parquet")
MAX_FIELD_CHARS = 4096
MAX_KEPT_ERRORS = 100

PathLike = str | os.PathLike[str]

_EXTENSIONS = {
    ".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".nt": "nt", ".ttl": "ttl", ".turtle": "ttl", ".parquet": "parquet", ".pq": "parquet",
}
_ALIASES = {"txt": "tsv", "ndjson": "jsonl", "ntriples": "nt", "turtle": "ttl", "pq": "parquet"}
FIELDS = ("head", "relation", "tail")
# Column / key names accepted for the three fields, in order of preference.
_FIELD_NAMES = (FIELDS, ("subject", "predicate", "object"))


class Triple(NamedTuple):
    head: str
    relation: str
    tail: str


class KGFormatError(ValueError):
    """A triples file is unusable or has a bad row; ``line`` is 1-based (the row number for Parquet)."""

    def __init__(self, path: PathLike, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")

    # The default pickling replays __init__ with the message only; Ray workers need the real fields.
    def __reduce__(self):
        return (type(self), (self.path, self.line, self.reason))


@dataclass
class ReadReport:
    triples: list[Triple] = field(default_factory=list)
    n_rows: int = 0
    n_bad: int = 0
    n_duplicates: int = 0
    errors: list[KGFormatError] = field(default_factory=list)


@dataclass(frozen=True)
class EvalQuestion:
    question: str
    head: str
    relation: str
    tail: str

    @property
    def triple(self) -> Triple:
        return Triple(self.head, self.relation, self.tail)


class _BadValue(Exception):
    """A row-level problem; the caller adds the file and line."""


# ---------------------------------------------------------------------------------------------
# Format detection and validation


def detect_format(path: PathLike, format: str | None = None) -> str:
    """The format named by ``format`` (if given) or by the file extension; a trailing .gz is ignored."""
    if format is not None:
        fmt = format.lower().lstrip(".")
        fmt = _ALIASES.get(fmt, fmt)
        if fmt not in FORMATS:
            raise KGFormatError(path, None, f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes[-1:] == [".gz"] and len(suffixes) > 1 and _EXTENSIONS.get(suffixes[-2]) != "parquet":
        suffixes.pop()
    fmt = _EXTENSIONS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise KGFormatError(
            path, None,
            f"unknown file extension; name the format explicitly, one of {', '.join(FORMATS)}",
        )
    return fmt


def _clean(value: str, name: str, limit: int) -> str:
    # Collapsing whitespace makes "New  York" and "New York\t" the same entity, and guarantees no
    # field can carry a tab or newline into a TSV we write later.
    text = " ".join(value.split())
    if not text:
        raise _BadValue(f"empty {name}")
    if len(text) > limit:
        raise _BadValue(f"{name} is {len(text)} characters, over the limit of {limit}")
    if "\x00" in text:
        raise _BadValue(f"NUL byte in {name}")
    return text


def _triple(path: str, line: int | None, values: Sequence[str], limit: int) -> Triple | KGFormatError:
    try:
        return Triple(*(_clean(v, n, limit) for v, n in zip(values, FIELDS)))
    except _BadValue as e:
        return KGFormatError(path, line, str(e))


def _is_header(fields: Sequence[str]) -> bool:
    return tuple(f.strip().lower() for f in fields) in _FIELD_NAMES


def _check_file(path: PathLike) -> None:
    p = Path(path)
    if p.is_dir():
        raise KGFormatError(path, None, "is a directory, expected a triples file")
    if not p.exists():
        raise KGFormatError(path, None, "no such file")


# ---------------------------------------------------------------------------------------------
# Line-based text formats


@contextmanager
def _open_binary(path: str) -> Iterator[IO[bytes]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise KGFormatError(path, None, f"cannot open: {e.strerror or e}") from None
    with f:
        # Sniff the gzip magic rather than trusting the name, so a forced format works on .gz too.
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            with gzip.GzipFile(fileobj=f) as gz:
                yield gz
        else:
            f.seek(0)
            yield f


def _split_lone_cr(f: IO[bytes]) -> Iterator[bytes]:
    """Lines of a binary file ending in \n, \r\n or a lone \r (old Mac files, or a mix of all three):
    binary iteration splits on \n only, which would glue CR-separated lines into one bad row."""
    for raw in f:
        body = raw.rstrip(b"\r\n")
        if b"\r" not in body:
            yield raw
            continue
        parts = body.split(b"\r")
        yield from (p + b"\r" for p in parts[:-1])
        yield parts[-1] + raw[len(body):]


def _lines(path: str) -> Iterator[tuple[int, str | KGFormatError]]:
    """(line number, text without line ending); an undecodable line yields its error instead.

    Decoding per line (not the whole file) is what gives an invalid byte an exact line number."""
    lineno = 0
    offset = 0
    with _open_binary(path) as f:
        try:
            for raw in _split_lone_cr(f):
                lineno += 1
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, start = raw[3:], start + 3
                try:
                    text: str | KGFormatError = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    text = KGFormatError(
                        path, lineno, f"invalid UTF-8 at byte offset {start + e.start} (byte 0x{raw[e.start]:02x})"
                    )
                yield lineno, text
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
            raise KGFormatError(path, lineno + 1, f"cannot read: {e}") from None


def _tsv_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    first = True
    for lineno, line in _lines(path):
        if isinstance(line, KGFormatError):
            first = False
            yield line
            continue
        if not line or line.isspace():
            continue
        fields = line.split("\t")
        if first:
            first = False
            if header and _is_header(fields):
                continue
        if len(fields) != 3:
            yield KGFormatError(
                path, lineno, f"expected 3 tab-separated columns (head, relation, tail), found {len(fields)}"
            )
            continue
        yield _triple(path, lineno, fields, limit)


def _csv_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    # csv's default per-field cap (131072) would fail before our own size check can name the field and
    # its length. Raising the process-wide cap only ever accepts more, so other csv users are unaffected.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    undecodable: list[KGFormatError] = []

    def feed() -> Iterator[str]:
        for _, line in _lines(path):
            if isinstance(line, KGFormatError):
                # csv cannot be told to skip a line, so hand it an empty one and fail the record.
                undecodable.append(line)
                yield "\n"
            else:
                yield line + "\n"

    # strict: a quote left open would otherwise swallow the rest of the file into one field, silently
    reader = csv.reader(feed(), skipinitialspace=True, strict=True)
    first = True
    while True:
        start = reader.line_num + 1  # a quoted field may span lines; report where the record starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            why = ("a quoted field is never closed (it runs to the end of the file)"
                   if "unexpected end of data" in str(e) else str(e))
            if reader.line_num < start:  # nothing consumed: stop rather than loop forever
                raise KGFormatError(path, start, f"CSV error: {why}") from None
            first = False
            yield KGFormatError(path, start, f"CSV error: {why}")
            continue
        if undecodable:
            first = False
            yield undecodable[0]
            undecodable.clear()
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if first:
            first = False
            if header and _is_header(row):
                continue
        if len(row) != 3:
            yield KGFormatError(
                path, start, f"expected 3 comma-separated columns (head, relation, tail), found {len(row)}"
            )
            continue
        yield _triple(path, start, row, limit)


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadValue(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _BadValue("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python will convert
        raise _BadValue(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _BadValue(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _json_str(obj: dict, key: str) -> str:
    if key not in obj:
        raise _BadValue(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadValue(f"{key!r} must be a string, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can smuggle in lone surrogates
        raise _BadValue(f"{key!r} contains an invalid character (lone surrogate)") from None
    return value


def _jsonl_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    for lineno, line in _lines(path):
        if isinstance(line, KGFormatError):
            yield line
            continue
        if not line or line.isspace():
            continue
        try:
            obj = _json_object(line)
            keys = next((k for k in _FIELD_NAMES if k[0] in obj), FIELDS)
            values = [_json_str(obj, k) for k in keys]
        except _BadValue as e:
            yield KGFormatError(path, lineno, str(e))
            continue
        yield _triple(path, lineno, values, limit)


# ---------------------------------------------------------------------------------------------
# RDF (N-Triples, Turtle)


def _read_text(path: str) -> str:
    with _open_binary(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise KGFormatError(path, None, f"cannot read: {e}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise KGFormatError(path, line, f"invalid UTF-8 at byte offset {e.start}") from None


def _local_name(iri: str, predicate: bool) -> str:
    name = re.split(r"[#/:]", iri.rstrip("/#"))[-1] or iri
    name = unquote(name).replace("_", " ")
    if predicate:
        # placeOfBirth -> place of birth, but keep acronyms: hasISBN -> has ISBN
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).split(" ")
        name = " ".join(w.lower() if w[1:].islower() else w for w in words)
    return name


_RdfRow = tuple[int | None, object, object, object]


def _rdf_rows(path: str, limit: int, rows: list[_RdfRow | KGFormatError]) -> Iterator[Triple | KGFormatError]:
    """Turn parsed RDF terms into readable triples, naming each node by its rdfs:label if it has one.

    ``rows`` may hold errors for bad lines; they pass through in place."""
    from rdflib import BNode, Literal
    from rdflib.namespace import RDFS

    def rank(lit: Literal) -> int:  # English, then untagged, then any other language
        lang = (lit.language or "").lower()
        return 0 if lang == "en" or lang.startswith("en-") else 1 if not lang else 2

    labels: dict[object, Literal] = {}
    for row in rows:
        if isinstance(row, KGFormatError):
            continue
        _, s, p, o = row
        if p == RDFS.label and isinstance(o, Literal) and (s not in labels or rank(o) < rank(labels[s])):
            labels[s] = o

    def name(node: object, predicate: bool = False) -> str:
        if node in labels:
            return str(labels[node])
        if isinstance(node, (Literal, BNode)):
            return str(node)
        return _local_name(str(node), predicate)

    for row in rows:
        if isinstance(row, KGFormatError):
            yield row
        elif row[2] != RDFS.label:  # labels are names, not facts
            line, s, p, o = row
            yield _triple(path, line, (name(s), name(p, True), name(o)), limit)


def _nt_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    from rdflib import BNode
    from rdflib.plugins.parsers.ntriples import W3CNTriplesParser

    # N-Triples is one triple per line, so parse line by line: exact line numbers, and a bad line can be
    # skipped. Labels may come after their use, so the whole file is parsed before any row is named.
    rows: list[_RdfRow | KGFormatError] = []
    bnode_ids: dict[str, BNode] = {}

    class Sink:
        def triple(self, s, p, o):
            rows.append((lineno, s, p, o))

    parser = W3CNTriplesParser(Sink(), bnode_context=bnode_ids)
    for lineno, line in _lines(path):
        if isinstance(line, KGFormatError):
            rows.append(line)
            continue
        parser.line = line
        try:
            parser.parseline()
        except Exception as e:  # rdflib raises several types for bad input; all mean "bad line"
            # rdflib's messages quote its own regexes; the unparsed rest of the line says more.
            message = str(e)
            reason = "syntax error" if message.startswith("Failed to eat") else message.split(":", 1)[0]
            column = len(line) - len(parser.line or "") + 1
            rows.append(KGFormatError(path, lineno, f"invalid N-Triples ({reason}) at column {column}: {line[:80]!r}"))

    # Name blank nodes by their label in the file (_:b1 -> "b1"), not rdflib's random id.
    original = {v: BNode(k) for k, v in bnode_ids.items()}
    rows = [r if isinstance(r, KGFormatError) else (r[0], original.get(r[1], r[1]), r[2], original.get(r[3], r[3]))
            for r in rows]
    yield from _rdf_rows(path, limit, rows)


def _ttl_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    from rdflib import Graph
    from rdflib.plugins.stores.memory import Memory

    class OrderedStore(Memory):  # a Graph is a set; remember parse order so rows come in file order
        def __init__(self) -> None:
            super().__init__()
            self.order: list[_RdfRow | KGFormatError] = []

        def add(self, triple, context, quoted=False):
            self.order.append((None, *triple))
            super().add(triple, context, quoted)

    # rdflib does not take a lone CR as a line break (Turtle does); CR/CRLF -> LF keeps lines as _lines counts
    # them, and any CR inside a literal is whitespace that cleaning collapses anyway
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    store = OrderedStore()
    try:
        Graph(store=store).parse(data=text, format="turtle")
    except Exception as e:  # rdflib raises BadSyntax and assorted others; all mean "bad file"
        message = str(e)
        m = re.search(r"\bline (\d+)", message)
        line = int(m.group(1)) if m else None
        why = re.search(r"Bad syntax \((.*?)\) at \^", message)
        reason = why.group(1) if why else message.splitlines()[0] if message else type(e).__name__
        lines = text.split("\n")  # as rdflib counts lines; splitlines() also splits on \x0b, \u2028...
        last = max((i for i, s in enumerate(lines, 1) if s.strip()), default=1)
        if isinstance(e, IndexError) or (line is not None and line > last):
            # rdflib says "string index out of range", or a line past the end, when the file stops mid-statement
            reason, line = ("unexpected end of file" if isinstance(e, IndexError) else f"{reason}, at end of file"), last
        near = f": {lines[line - 1][:80]!r}" if line is not None and 0 < line <= len(lines) else ""
        raise KGFormatError(path, line, f"invalid Turtle ({reason}){near}") from None
    yield from _rdf_rows(path, limit, store.order)


# ---------------------------------------------------------------------------------------------
# Parquet


_BAD_UTF8 = "\x00<invalid UTF-8>"  # a sentinel no cleaned field can equal (cleaning rejects NUL)


def _utf8_each(col) -> list[str | None]:
    """A string column's values decoded one by one; undecodable ones become _BAD_UTF8."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    raw = pc.cast(col, pa.large_binary()) if not pa.types.is_string(col.type) else col.view(pa.binary())
    out: list[str | None] = []
    for v in raw.to_pylist():
        try:
            out.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(_BAD_UTF8)
    return out


def _parquet_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise KGFormatError(path, None, f"not a readable Parquet file ({e})") from None
    except UnicodeDecodeError:  # a damaged footer can hold column names that are not UTF-8
        raise KGFormatError(path, None, "not a readable Parquet file (a column name is not valid UTF-8)") from None
    names = schema.names
    columns = next((c for c in _FIELD_NAMES if all(n in names for n in c)), None)
    if columns is None:
        missing = ", ".join(n for n in FIELDS if n not in names)
        raise KGFormatError(
            path, None,
            f"missing column {missing}; need head, relation, tail (or subject, predicate, object), "
            f"found columns: {', '.join(names) or 'none'}",
        )
    for c in columns:
        t = schema.field(c).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise KGFormatError(path, None, f"column {c!r} has type {schema.field(c).type}, expected string")

    row = 0
    try:
        for batch in pf.iter_batches(columns=list(columns), batch_size=65536):
            try:
                cols = [col.to_pylist() for col in batch.columns]
            except UnicodeDecodeError:  # Parquet has no checksums by default: damaged data can decode as bad UTF-8
                cols = [_utf8_each(col) for col in batch.columns]
            for values in zip(*cols):
                row += 1
                if None in values:
                    yield KGFormatError(path, row, f"null {FIELDS[values.index(None)]}")
                elif _BAD_UTF8 in values:
                    yield KGFormatError(path, row, f"invalid UTF-8 in {FIELDS[values.index(_BAD_UTF8)]}")
                else:
                    yield _triple(path, row, values, limit)
    except (pa.ArrowException, OSError) as e:
        raise KGFormatError(path, row + 1, f"corrupt Parquet data ({e})") from None


_READERS: dict[str, Callable[[str, int, bool], Iterator[Triple | KGFormatError]]] = {
    "tsv": _tsv_rows,
    "csv": _csv_rows,
    "jsonl": _jsonl_rows,
    "nt": _nt_rows,
    "ttl": _ttl_rows,
    "parquet": _parquet_rows,
}


# ---------------------------------------------------------------------------------------------
# Public reading API


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def read_triples(
    paths: PathLike | Sequence[PathLike],
    format: str | None = None,
    *,
    skip_bad: bool = False,
    max_field_chars: int = MAX_FIELD_CHARS,
) -> ReadReport:
    """Read all triples from one or more files, dropping exact duplicates (first occurrence kept).

    Without ``skip_bad`` the first bad row raises; with it, bad rows are counted and skipped."""
    plan = []
    for p in _as_paths(paths):  # check every file before spending time reading any
        _check_file(p)
        plan.append((p, detect_format(p, format)))
    report = ReadReport()
    seen: set[Triple] = set()
    for p, fmt in plan:
        for item in _READERS[fmt](str(p), max_field_chars, True):
            report.n_rows += 1
            if isinstance(item, KGFormatError):
                if not skip_bad:
                    raise item
                report.n_bad += 1
                if len(report.errors) < MAX_KEPT_ERRORS:
                    report.errors.append(item)
            elif item in seen:
                report.n_duplicates += 1
            else:
                seen.add(item)
                report.triples.append(item)
    return report


def iter_triples(
    path: PathLike,
    format: str | None = None,
    *,
    skip_bad: bool = False,
    max_field_chars: int = MAX_FIELD_CHARS,
    on_bad: Callable[[KGFormatError], None] | None = None,
) -> Iterator[Triple]:
    """Stream triples from one file (no de-duplication). ``on_bad`` sees each skipped row's error."""
    _check_file(path)  # here, not in the generator, so a missing file fails at the call
    fmt = detect_format(path, format)
    return _checked(_READERS[fmt](str(path), max_field_chars, True), skip_bad, on_bad)


def _checked(
    items: Iterator[Triple | KGFormatError], skip_bad: bool, on_bad: Callable[[KGFormatError], None] | None = None
) -> Iterator[Triple]:
    for item in items:
        if isinstance(item, KGFormatError):
            if not skip_bad:
                raise item
            if on_bad is not None:
                on_bad(item)
        else:
            yield item


def read_eval_set(folder: PathLike) -> tuple[list[Triple], list[EvalQuestion]]:
    """Read an evaluation set folder (triples.tsv + questions.jsonl; see DESIGN.md, a contract)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KGFormatError(folder, None, "no such folder" if not folder.exists() else "not a folder")
    triples_path, questions_path = folder / "triples.tsv", folder / "questions.jsonl"
    _check_file(triples_path)
    _check_file(questions_path)
    # The contract says no header, so a first line reading "head relation tail" is data here.
    triples = list(dict.fromkeys(_checked(_tsv_rows(str(triples_path), MAX_FIELD_CHARS, False), False)))
    known = set(triples)

    path = str(questions_path)
    questions: list[EvalQuestion] = []
    for lineno, line in _lines(path):
        if isinstance(line, KGFormatError):
            raise line
        if not line or line.isspace():
            continue
        try:
            obj = _json_object(line)
            q = EvalQuestion(*(_clean(_json_str(obj, k), k, MAX_FIELD_CHARS) for k in ("question", *FIELDS)))
        except _BadValue as e:
            raise KGFormatError(path, lineno, str(e)) from None
        if q.triple not in known:
            raise KGFormatError(
                path, lineno, f"gold triple ({q.head!r}, {q.relation!r}, {q.tail!r}) is not a line of triples.tsv"
            )
        questions.append(q)
    return triples, questions


# ---------------------------------------------------------------------------------------------
# Writing


def _normalised(triples: Iterable[Triple | tuple]) -> Iterator[Triple]:
    # Writing what the readers would read back keeps every write -> read a round trip.
    for i, t in enumerate(triples, 1):
        if len(t) != 3:
            raise ValueError(f"triple {i}: expected (head, relation, tail), got {len(t)} values")
        for value, name in zip(t, FIELDS):
            if not isinstance(value, str):
                raise ValueError(f"triple {i}: {name} must be a string, got {type(value).__name__}")
        try:
            yield Triple(*(_clean(v, n, sys.maxsize) for v, n in zip(t, FIELDS)))
        except _BadValue as e:
            raise ValueError(f"triple {i}: {e}") from None


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A new file next to ``path`` that replaces it only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(rows: Iterator[Triple], out: io.TextIOBase, fmt: str) -> int:
    n = 0
    if fmt == "jsonl":
        for n, t in enumerate(rows, 1):
            out.write(json.dumps(t._asdict(), ensure_ascii=False) + "\n")
        return n
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
        for n, t in enumerate(rows, 1):
            writer.writerow(t)
        return n
    # TSV gets no header (the eval-set contract has none), unless the first triple would be taken for one.
    for n, t in enumerate(rows, 1):
        if n == 1 and _is_header(t):
            out.write("\t".join(FIELDS) + "\n")
        out.write("\t".join(t) + "\n")
    return n


def _write_parquet(rows: Iterator[Triple], out: IO[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in FIELDS])
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        while chunk := list(islice(rows, 65536)):
            writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in zip(*chunk)], schema=schema))
            n += len(chunk)
    return n


def write_triples(triples: Iterable[Triple | tuple], path: PathLike, format: str | None = None) -> int:
    """Write triples (tsv, csv, jsonl, parquet; text formats gzipped if the name ends in .gz) atomically.

    Fields are whitespace-normalised like the readers do; an empty field raises ValueError and the
    target file is left untouched. Returns the number of triples written."""
    path = Path(path)
    fmt = detect_format(path, format)
    if fmt not in WRITABLE_FORMATS:
        raise KGFormatError(path, None, f"cannot write {fmt}; writable formats: {', '.join(WRITABLE_FORMATS)}")
    rows = _normalised(triples)
    with _atomic_file(path) as raw:
        if fmt == "parquet":
            return _write_parquet(rows, raw)
        gz = path.suffix.lower() == ".gz"
        # mtime=0 and the final name keep the gzip header free of the temp name and reproducible
        out = gzip.GzipFile(filename=path.stem, fileobj=raw, mode="wb", mtime=0) if gz else raw
        text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        n = _write_text(rows, text, fmt)
        text.flush()
        text.detach()  # leave closing the binary file to _atomic_file
        if gz:
            out.close()
        return n
