"""Triples files, format by format: the Triple every reader yields, the KGFormatError it yields for a
bad row (file, line, reason), format names and detection, field cleaning, and the readers of the
line-based formats (TSV, CSV, JSONL) and Parquet, and the writers. RDF (N-Triples, Turtle): rdf.py.
The entry points over all of them (read_triples, write_triples, ...) are triples.py.

A reader is `reader(path, limit, header) -> Iterator[Triple | KGFormatError]`: rows in file order, a bad
row as its error in place (the caller decides whether to raise or skip); a file that cannot be read at
all raises KGFormatError.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import IO, NamedTuple

FORMATS = ("tsv", "csv", "jsonl", "nt", "ttl", "parquet")
MAX_FIELD_CHARS = 4096

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


class BadValue(Exception):
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


def clean_field(value: str, name: str, limit: int) -> str:
    """The field as stored: whitespace collapsed; BadValue if empty, over `limit` characters, or holding NUL."""
    # Collapsing whitespace makes "New  York" and "New York\t" the same entity, and guarantees no
    # field can carry a tab or newline into a TSV we write later.
    text = " ".join(value.split())
    if not text:
        raise BadValue(f"empty {name}")
    if len(text) > limit:
        raise BadValue(f"{name} is {len(text)} characters, over the limit of {limit}")
    if "\x00" in text:
        raise BadValue(f"NUL byte in {name}")
    return text


def to_triple(path: str, line: int | None, values: Sequence[str], limit: int) -> Triple | KGFormatError:
    """A row's three values as a cleaned Triple, or the KGFormatError (path:line) that says which field is bad."""
    try:
        return Triple(*(clean_field(v, n, limit) for v, n in zip(values, FIELDS)))
    except BadValue as e:
        return KGFormatError(path, line, str(e))


def is_header(fields: Sequence[str]) -> bool:
    """Whether a first row names the fields (head, relation, tail or subject, predicate, object)."""
    return tuple(f.strip().lower() for f in fields) in _FIELD_NAMES


def check_file(path: PathLike) -> None:
    """KGFormatError unless `path` is an existing file (checked for every input before any is read)."""
    p = Path(path)
    if p.is_dir():
        raise KGFormatError(path, None, "is a directory, expected a triples file")
    if not p.exists():
        raise KGFormatError(path, None, "no such file")


# ---------------------------------------------------------------------------------------------
# Line-based text formats


@contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
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


def numbered_lines(path: str) -> Iterator[tuple[int, str | KGFormatError]]:
    """(line number, text without line ending); an undecodable line yields its error instead.

    Decoding per line (not the whole file) is what gives an invalid byte an exact line number."""
    lineno = 0
    offset = 0
    with open_binary(path) as f:
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


def tsv_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    first = True
    for lineno, line in numbered_lines(path):
        if isinstance(line, KGFormatError):
            first = False
            yield line
            continue
        if not line or line.isspace():
            continue
        fields = line.split("\t")
        if first:
            first = False
            if header and is_header(fields):
                continue
        if len(fields) != 3:
            yield KGFormatError(
                path, lineno, f"expected 3 tab-separated columns (head, relation, tail), found {len(fields)}"
            )
            continue
        yield to_triple(path, lineno, fields, limit)


def csv_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    # csv's default per-field cap (131072) would fail before our own size check can name the field and
    # its length. Raising the process-wide cap only ever accepts more, so other csv users are unaffected.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    undecodable: list[KGFormatError] = []

    def feed() -> Iterator[str]:
        for _, line in numbered_lines(path):
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
            if header and is_header(row):
                continue
        if len(row) != 3:
            yield KGFormatError(
                path, start, f"expected 3 comma-separated columns (head, relation, tail), found {len(row)}"
            )
            continue
        yield to_triple(path, start, row, limit)


def json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadValue(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadValue("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python will convert
        raise BadValue(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadValue(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def json_str(obj: dict, key: str) -> str:
    if key not in obj:
        raise BadValue(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadValue(f"{key!r} must be a string, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can smuggle in lone surrogates
        raise BadValue(f"{key!r} contains an invalid character (lone surrogate)") from None
    return value


def jsonl_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    for lineno, line in numbered_lines(path):
        if isinstance(line, KGFormatError):
            yield line
            continue
        if not line or line.isspace():
            continue
        try:
            obj = json_object(line)
            keys = next((k for k in _FIELD_NAMES if k[0] in obj), FIELDS)
            values = [json_str(obj, k) for k in keys]
        except BadValue as e:
            yield KGFormatError(path, lineno, str(e))
            continue
        yield to_triple(path, lineno, values, limit)


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


def parquet_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
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
                    yield to_triple(path, row, values, limit)
    except (pa.ArrowException, OSError) as e:
        raise KGFormatError(path, row + 1, f"corrupt Parquet data ({e})") from None


# ---------------------------------------------------------------------------------------------
# Writing


def write_text(rows: Iterator[Triple], out: io.TextIOBase, fmt: str) -> int:
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
        if n == 1 and is_header(t):
            out.write("\t".join(FIELDS) + "\n")
        elif n == 1 and t.head.startswith("\ufeff"):  # readers strip one byte-order mark at the file's start:
            out.write("\ufeff")                          # write one, so the head keeps its own
        out.write("\t".join(t) + "\n")
    return n


def write_parquet(rows: Iterator[Triple], out: IO[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in FIELDS])
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        while chunk := list(islice(rows, 65536)):
            writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in zip(*chunk)], schema=schema))
            n += len(chunk)
    return n
