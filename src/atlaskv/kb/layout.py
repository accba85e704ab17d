"""The KB directory format: what is on disk, how it is written durably, and how it is checked.

Layout (format_version 1):

    manifest.json                          the only mutable file; replaced atomically (os.replace)
    segments/seg-<v>.records.parquet       id, head, relation, tail, masked, key_text, value_text, triple_hash
    segments/seg-<v>.keys.f16.npy          [rows, d_in] float16, memory-mappable
    segments/seg-<v>.values.f16.npy        [rows, d_in] float16
    tombstones/removed-<v>.npy             sorted int64 ids of removed entries (all removals so far)
    index/hikvp-<v>.<array>.npy            the HiKVP tree (one file per name in ARRAYS; leaves are entry ids)
    index/add-<v>.npy                      [n, 2] int64 (entry id, inter cluster) of entries added live since

Segments are immutable: `add` writes one new segment, `remove` one new tombstone file, and each becomes
visible only when the new manifest replaces the old one. A crash at any point leaves the previous version
intact; files a crashed writer left behind are not in the manifest, so they are never read, and the next
writer removes them. (DESIGN.md suggests a tombstone column in the records table; a separate tombstone
file keeps records immutable, so a removal rewrites kilobytes instead of the whole table.)

A build writes a whole KB in a hidden directory beside its target (.<name>.building-<pid>) and renames it
into place; an overwritten KB is moved aside (.<name>.replaced-<pid>) first and deleted last.

The manifest lists every file with its size and sha256; `check_manifest` and `check_files` treat it as
untrusted input. Everything here works on a directory path and a manifest dict: store.KnowledgeBase is the
API over it, ray_build writes the same format from a cluster.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlaskv.kb.records import KVRecord
from atlaskv.kb.triples import Triple

FORMAT = "atlaskv-kb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_COUNT = 1 << 40  # entries, versions, ids: far above any real KB, far below an overflow
MAX_DIM = 1 << 16
DATA_DIRS = ("segments", "tombstones", "index")
# The HiKVP tree's arrays (index.Hierarchy's fields), one index/<stem>.<name>.npy each.
ARRAYS = ("roots", "inters", "root_offsets", "root_children", "inter_offsets", "inter_children")

RECORD_SCHEMA = pa.schema([
    ("id", pa.int64()), ("head", pa.string()), ("relation", pa.string()), ("tail", pa.string()),
    ("masked", pa.string()), ("key_text", pa.string()), ("value_text", pa.string()),
    ("triple_hash", pa.int64()),
])


class KBError(RuntimeError):
    """A KB directory that is missing, corrupt, locked, or used in a way it does not allow."""


def triple_hash(t: Triple) -> int:
    """Stable 63-bit id of a triple (dedupe and removal read this column only, not the text)."""
    h = hashlib.blake2b("\x1f".join(t).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def records_table(records: Sequence[KVRecord], start_id: int) -> pa.Table:
    """The records of one segment (ids start_id, start_id + 1, ...) as a RECORD_SCHEMA table."""
    cols = {
        "id": np.arange(start_id, start_id + len(records), dtype=np.int64),
        "head": [r.triple.head for r in records], "relation": [r.triple.relation for r in records],
        "tail": [r.triple.tail for r in records], "masked": [r.masked for r in records],
        "key_text": [r.key_text for r in records], "value_text": [r.value_text for r in records],
        "triple_hash": np.array([triple_hash(r.triple) for r in records], dtype=np.int64),
    }
    return pa.table(cols, schema=RECORD_SCHEMA)


# ---------------------------------------------------------------------------------------------- durable files
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict:
    """The manifest's record of one file: its size and sha256."""
    p = root / rel
    return {"bytes": p.stat().st_size, "sha256": sha256(p)}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(root: Path, m: dict) -> None:
    """The commit point of every change: data directories synced, then manifest.json replaced atomically."""
    for d in DATA_DIRS:
        if (root / d).is_dir():
            fsync_dir(root / d)
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)  # the commit point
    fsync_dir(root)


def write_segment(root: Path, m: dict, table: pa.Table, keys: np.ndarray, values: np.ndarray, dim: int) -> None:
    """One new immutable segment of version m["version"] (records Parquet + fp16 keys and values),
    fsynced and entered in the manifest `m` (visible once `m` is committed)."""
    if keys.shape != (table.num_rows, dim) or values.shape != keys.shape:
        raise KBError(f"embedding shape {keys.shape}/{values.shape} does not match "
                      f"{table.num_rows} records of dim {dim}")
    v = m["version"]
    (root / "segments").mkdir(exist_ok=True)
    seg = {"records": f"segments/seg-{v:06d}.records.parquet", "keys": f"segments/seg-{v:06d}.keys.f16.npy",
           "values": f"segments/seg-{v:06d}.values.f16.npy", "rows": table.num_rows,
           "first_id": int(table.column("id")[0].as_py())}
    with open(root / seg["records"], "wb") as f:
        pq.write_table(table, f, compression="zstd", row_group_size=1 << 16)  # citations read one group
        f.flush()
        os.fsync(f.fileno())
    write_npy(root / seg["keys"], np.ascontiguousarray(keys, np.float16))
    write_npy(root / seg["values"], np.ascontiguousarray(values, np.float16))
    for k in ("records", "keys", "values"):
        m["files"][seg[k]] = file_entry(root, seg[k])
    m["segments"].append(seg)


@contextlib.contextmanager
def write_lock(root: Path):
    """One writer at a time per KB directory (readers never block)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KBError(f"{root}: another process is writing this KB") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- builds
def check_build_target(out: str | Path, overwrite: bool) -> Path:
    """A build may write to `out` only if it is absent, empty, or (with overwrite) an existing KB."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise KBError(f"{out}: exists and is not empty (use overwrite=True / --overwrite)")
        if not (out / MANIFEST).is_file():
            raise KBError(f"{out}: refusing to overwrite a directory that is not a KB")
    return out


def _pid_alive(name: str) -> bool:
    """Whether the process whose pid ends a temp directory's name (".kb.building-1234") still runs."""
    try:
        os.kill(int(name.rsplit("-", 1)[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def swap_into_place(tmp: Path, out: Path) -> None:
    """A finished build at `tmp` becomes `out`; an old KB there is moved aside first and deleted last
    (a kill between the two renames is undone by recover_swap on the next open or build)."""
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(out: Path) -> None:
    """A build with overwrite that was killed between its two renames left no KB at `out` and the old one
    at .<name>.replaced-<pid>: put the old one back (only when that build is dead)."""
    if out.exists() or not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if (old / MANIFEST).is_file() and not _pid_alive(old.name):
            with contextlib.suppress(OSError):
                os.rename(old, out)
                fsync_dir(out.parent)
            return


def remove_stale_temps(out: Path) -> None:
    """Temp directories of killed builds of `out` (never read, but they hold a whole KB's worth of files)."""
    for pattern in (f".{out.name}.building-*", f".{out.name}.replaced-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not _pid_alive(p.name) and (out.exists() or "building" in p.name):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading and checking
def read_manifest(path: Path) -> dict:
    """The manifest of the KB at `path` (a killed overwrite is undone first): JSON of this format."""
    mf = path / MANIFEST
    if not path.exists():
        recover_swap(path)
    if not path.is_dir():
        raise KBError(f"{path}: no KB directory at this path")
    if not mf.is_file():
        raise KBError(f"{mf}: missing; {path} is not a KB (or its build never completed)")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise KBError(f"{mf}: {mf.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        manifest = json.loads(mf.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KBError(f"{mf}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise KBError(f"{mf}: not an atlaskv KB manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise KBError(f"{mf}: format_version {manifest.get('format_version')} is not supported "
                      f"(this atlaskv reads {FORMAT_VERSION})")
    return manifest


def check_manifest(root: Path, m: dict) -> None:
    """A manifest is untrusted input too: every path it uses must be a file it lists (whose place
    check_files then checks), and every count a plausible integer that agrees with the others."""
    mf = root / MANIFEST

    def fail(why: str):
        raise KBError(f"{mf}: {why}")

    def count(v, what: str, hi: int = MAX_COUNT, lo: int = 0) -> int:
        if type(v) is not int or not lo <= v <= hi:
            fail(f"{what} is {v!r}, expected an integer from {lo} to {hi}")
        return v

    try:
        files = m["files"]
        if not isinstance(files, dict):
            fail("'files' is not an object")
        for rel, meta in files.items():
            count(meta["bytes"], f"size of {rel!r}", 1 << 50)
            if not isinstance(meta["sha256"], str):
                fail(f"sha256 of {rel!r} is not a string")

        def listed(rel, what: str) -> None:
            if not isinstance(rel, str) or rel not in files:
                fail(f"{what} {rel!r} is not a file listed in the manifest")

        count(m["version"], "version")
        if not isinstance(m["encoder"]["name"], str):
            fail("encoder name is not a string")
        count(m["encoder"]["dim"], "encoder dim", MAX_DIM, 1)
        shape = m["encoder"].get("exact_pass", [1, 1])
        if not (isinstance(shape, list) and len(shape) == 2):
            fail(f"encoder exact_pass {shape!r} is not [tokens, rows]")
        for n in shape:
            count(n, "encoder exact_pass", 1 << 16, 1)
        for i, s in enumerate(m["segments"]):
            for k in ("records", "keys", "values"):
                listed(s[k], f"segment {i} {k}")
            count(s["rows"], f"segment {i} rows")
        c = m["counts"]
        for k in ("entries", "triples", "entries_total", "removed_entries"):
            count(c[k], f"counts.{k}")
        removed = m["removed"]
        if removed:
            listed(removed["file"], "tombstone file")
        n_removed = count(removed["count"], "removed.count") if removed else 0
        if c["entries"] != c["entries_total"] - c["removed_entries"] or c["removed_entries"] != n_removed:
            fail(f"counts do not add up: {c['entries']} live entries, {c['entries_total']} stored, "
                 f"{c['removed_entries']} removed, {n_removed} in the tombstone file")
        if c["triples"] > c["entries"] or count(m["next_id"], "next_id") < c["entries_total"]:
            fail(f"counts do not add up: {c['triples']} triples in {c['entries']} entries, next id {m['next_id']}")
        ix = m.get("index")
        if ix:
            for name in ARRAYS:
                listed(f"index/{ix['stem']}.{name}.npy", "index file")
            for a in ix["additions"]:
                listed(a["file"], "index addition")
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        fail(f"malformed manifest ({type(e).__name__}: {e})")


def check_files(root: Path, m: dict, deep: bool) -> None:
    """Every listed file inside `root`, present, of its listed size (deep: its sha256 too, and every
    segment's row count and embedding shape); the segments' rows add up to counts.entries_total."""
    rows = 0
    for rel, meta in m["files"].items():
        p = (root / rel).resolve()
        if root.resolve() not in p.parents:
            raise KBError(f"{root / MANIFEST}: file path {rel!r} escapes the KB directory")
        if not p.is_file():
            raise KBError(f"{p}: missing (listed in {MANIFEST} version {int(m['version'])})")
        if p.stat().st_size != meta["bytes"]:
            raise KBError(f"{p}: {p.stat().st_size} bytes, expected {meta['bytes']} (truncated or changed)")
        if deep and sha256(p) != meta["sha256"]:
            raise KBError(f"{p}: checksum mismatch (the file is corrupt)")
    for s in m["segments"]:
        rows += s["rows"]
        if deep:
            dim = int(m["encoder"]["dim"])
            n = pq.ParquetFile(root / s["records"]).metadata.num_rows
            for k in ("keys", "values"):
                arr = np.load(root / s[k], mmap_mode="r", allow_pickle=False)
                if arr.shape != (s["rows"], dim) or arr.dtype != np.float16:
                    raise KBError(f"{root / s[k]}: shape {arr.shape} {arr.dtype}, "
                                  f"expected ({s['rows']}, {dim}) float16")
            if n != s["rows"]:
                raise KBError(f"{root / s['records']}: {n} rows, expected {s['rows']}")
    if rows != m["counts"]["entries_total"]:
        raise KBError(f"{root / MANIFEST}: segments hold {rows} entries, counts say "
                      f"{m['counts']['entries_total']}")


def check_tombstones(root: Path, m: dict) -> None:
    """The tombstone file holds as many ids as the manifest counts (after check_files vouched for it)."""
    removed = m["removed"]
    if removed:
        p = root / removed["file"]
        ids = np.load(p, mmap_mode="r", allow_pickle=False)
        if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != removed["count"]:
            raise KBError(f"{p}: {ids.shape} {ids.dtype} ids, expected {removed['count']} int64 (removed.count)")


def orphans(root: Path, m: dict) -> list[Path]:
    """Files in the data directories that the manifest does not list (left by a crashed writer), other than
    those a segment merge retired and keeps a while for readers of earlier versions (m["retired"])."""
    listed = set(m["files"]) | set(m.get("retired") or {})
    out = []
    for d in DATA_DIRS:
        if (root / d).is_dir():
            out += [p for p in (root / d).iterdir() if f"{d}/{p.name}" not in listed]
    return out
