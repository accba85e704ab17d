"""Knowledge-graph triples: read and write them, and say exactly where and why a file is bad.

Every reader yields rows in file order; a bad row becomes a `KGFormatError` naming file, line and
reason. Without ``skip_bad`` the first one is raised before the caller has done anything with the
data, which is what lets the CLI promise that a failed build writes nothing.

This module holds the entry points (read_triples, iter_triples, read_eval_set, write_triples) and
re-exports Triple, KGFormatError, FORMATS, detect_format and check_file; the readers and writers, format
by format, are formats.py (TSV, CSV, JSONL, Parquet; Triple and KGFormatError live there) and rdf.py
(N-Triples, Turtle).
"""

from __future__ import annotations

import gzip
import io
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from atlaskv.kb.formats import (FIELDS, FORMATS, MAX_FIELD_CHARS, BadValue, KGFormatError, PathLike, Triple,
                                check_file, clean_field, csv_rows, detect_format, json_object, json_str,
                                jsonl_rows, numbered_lines, parquet_rows, tsv_rows, write_parquet, write_text)
from atlaskv.kb.rdf import nt_rows, ttl_rows

__all__ = [
    "FORMATS",
    "MAX_FIELD_CHARS",
    "EvalQuestion",
    "KGFormatError",
    "ReadReport",
    "Triple",
    "check_file",
    "detect_format",
    "iter_triples",
    "read_eval_set",
    "read_triples",
    "write_triples",
]

WRITABLE_FORMATS = ("tsv", "csv", "jsonl", "parquet")
MAX_KEPT_ERRORS = 100


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


_READERS: dict[str, Callable[[str, int, bool], Iterator[Triple | KGFormatError]]] = {
    "tsv": tsv_rows,
    "csv": csv_rows,
    "jsonl": jsonl_rows,
    "nt": nt_rows,
    "ttl": ttl_rows,
    "parquet": parquet_rows,
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
        check_file(p)
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
    check_file(path)  # here, not in the generator, so a missing file fails at the call
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
    check_file(triples_path)
    check_file(questions_path)
    # The contract says no header, so a first line reading "head relation tail" is data here.
    triples = list(dict.fromkeys(_checked(tsv_rows(str(triples_path), MAX_FIELD_CHARS, False), False)))
    known = set(triples)

    path = str(questions_path)
    questions: list[EvalQuestion] = []
    for lineno, line in numbered_lines(path):
        if isinstance(line, KGFormatError):
            raise line
        if not line or line.isspace():
            continue
        try:
            obj = json_object(line)
            q = EvalQuestion(*(clean_field(json_str(obj, k), k, MAX_FIELD_CHARS) for k in ("question", *FIELDS)))
        except BadValue as e:
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
            yield Triple(*(clean_field(v, n, sys.maxsize) for v, n in zip(t, FIELDS)))
        except BadValue as e:
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
            return write_parquet(rows, raw)
        gz = path.suffix.lower() == ".gz"
        # mtime=0 and the final name keep the gzip header free of the temp name and reproducible
        out = gzip.GzipFile(filename=path.stem, fileobj=raw, mode="wb", mtime=0) if gz else raw
        text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        n = write_text(rows, text, fmt)
        text.flush()
        text.detach()  # leave closing the binary file to _atomic_file
        if gz:
            out.close()
        return n
