"""KB directory: records + fp16 embeddings + manifest, versioned, append/remove, crash-safe.

Layout (format_version 1):

    manifest.json                          the only mutable file; replaced atomically (os.replace)
    segments/seg-<v>.records.parquet       id, head, relation, tail, masked, key_text, value_text, triple_hash
    segments/seg-<v>.keys.f16.npy          [rows, d_in] float16, memory-mappable
    segments/seg-<v>.values.f16.npy        [rows, d_in] float16
    tombstones/removed-<v>.npy             sorted int64 ids of removed entries (all removals so far)

Segments are immutable: `add` writes one new segment, `remove` one new tombstone file, and each becomes
visible only when the new manifest replaces the old one. A crash at any point leaves the previous version
intact; files a crashed writer left behind are not in the manifest, so they are never read, and the next
writer removes them. (DESIGN.md suggests a tombstone column in the records table; a separate tombstone
file keeps records immutable, so a removal rewrites kilobytes instead of the whole table.)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlaskv.kb.encoder import DEFAULT_ENCODER, Encoder, encode_records, load_encoder
from atlaskv.kb.triples import Triple, read_triples
from atlaskv.kb.records import DIRECTIONS, KVRecord, RelationNouns, triples_to_records

FORMAT = "atlaskv-kb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_COUNT = 1 << 40  # entries, versions, ids: far above any real KB, far below an overflow
MAX_DIM = 1 << 16
DATA_DIRS = ("segments", "tombstones", "index")


class KBError(RuntimeError):
    """A KB directory that is missing, corrupt, locked, or used in a way it does not allow."""


@dataclass(frozen=True)
class UpdateResult:
    added: int = 0
    removed: int = 0
    duplicates: int = 0
    not_found: int = 0
    version: int = 0


def triple_hash(t: Triple) -> int:
    """Stable 63-bit id of a triple (dedupe and removal read this column only, not the text)."""
    h = hashlib.blake2b("\x1f".join(t).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


RECORD_SCHEMA = pa.schema([
    ("id", pa.int64()), ("head", pa.string()), ("relation", pa.string()), ("tail", pa.string()),
    ("masked", pa.string()), ("key_text", pa.string()), ("value_text", pa.string()),
    ("triple_hash", pa.int64()),
])


class KnowledgeBase:
    """A KB directory. Build with `KnowledgeBase.build(...)`, open with `KnowledgeBase.open(path)`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._encoder: Encoder | None = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "KnowledgeBase":
        path = Path(path)
        mf = path / MANIFEST
        if not path.exists():
            _recover_swap(path)
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
        kb = cls(path, manifest)
        kb._check_manifest()
        kb._check_files(deep=verify)
        if verify:
            kb._check_tombstones()
        return kb

    @classmethod
    def create(cls, out: str | Path, encoder: str | Encoder | None = None, directions: str = "tail",
               nouns: RelationNouns | None = None) -> "KnowledgeBase":
        """An empty KB (version 0) to `add` to, in a directory that does not exist or is empty."""
        out = Path(out)
        if directions not in DIRECTIONS:
            raise KBError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise KBError(f"{out}: exists and is not an empty directory")
        enc = encoder if not isinstance(encoder, (str, type(None))) else load_encoder(encoder)
        out.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": 0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "encoder": {"name": enc.name, "dim": enc.dim}, "directions": directions,
            "next_id": 0, "segments": [], "removed": None, "files": {},
            "counts": {"entries": 0, "triples": 0, "entries_total": 0, "removed_entries": 0},
            "relation_templates": (nouns.to_json() if nouns else {}), "history": [], "index": None,
        }
        kb = cls(out, manifest)
        kb._encoder = enc
        with kb._write_lock():
            kb._commit(manifest)
        return kb

    @classmethod
    def build(cls, sources: str | Path | Sequence[str | Path] | Iterable[Triple], out: str | Path, *,
              encoder: str | Encoder | None = None, directions: str = "tail", format: str | None = None,
              skip_bad: bool = False, overwrite: bool = False, chat: Callable | None = None,
              batch_size: int = 256, show_progress: bool | None = None, index: bool = True,
              engine: str = "local", address: str | None = None, **ray_options) -> "KnowledgeBase":
        """Read triples (files or an iterable of triples), convert, encode and write a new KB.

        Every input row is read and validated before anything is written: a bad row stops the build
        with its file and line (unless skip_bad), and `out` is left as it was.

        engine="ray" runs the same pipeline on Ray (atlaskv.kb.ray_build; `pip install 'atlaskv[ray]'`):
        `address` None/"local" (a local Ray instance), "auto" or "ray://host:port"; `ray_options` are
        distributed.build's (actors, num_gpus_per_actor, num_cpus_per_actor, segment_rows, ...).
        """
        if engine == "ray":
            from atlaskv.kb.ray_build import build as ray_build

            return ray_build(sources, out, encoder=encoder, directions=directions, format=format,
                             skip_bad=skip_bad, overwrite=overwrite, chat=chat, batch_size=batch_size,
                             show_progress=show_progress, index=index, address=address, **ray_options)
        if engine != "local":
            raise KBError(f"engine must be 'local' or 'ray', got {engine!r}")
        if address is not None or ray_options:
            raise KBError(f"address / {sorted(ray_options) or 'options'} apply to engine='ray' only")
        out = _check_build_target(out, overwrite)
        triples, report = _gather(sources, format, skip_bad)
        if not triples:
            raise KBError(f"no triples to build a KB from ({_describe(sources)})")
        # Build beside the target and rename at the end: an interrupted build never looks like a KB at
        # `out`, and an overwritten KB stays intact until the new one is complete.
        out.parent.mkdir(parents=True, exist_ok=True)
        _recover_swap(out)
        _remove_stale_temps(out)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            nouns = RelationNouns(chat=chat)
            kb = cls.create(tmp, encoder, directions, nouns=nouns)
            kb._append(triples, nouns, batch_size, show_progress,
                       note={"op": "build", "sources": _describe(sources), **report}, index=index)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kb.path = out
        return kb

    # ------------------------------------------------------------------ facts
    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    def __len__(self) -> int:
        """Live triples (an entry per direction still counts its triple once)."""
        return int(self.manifest["counts"]["triples"])

    @property
    def num_entries(self) -> int:
        return int(self.manifest["counts"]["entries"])

    def bytes_on_disk(self) -> int:
        return (self.path / MANIFEST).stat().st_size + sum(f["bytes"] for f in self.manifest["files"].values())

    def info(self) -> dict:
        c = self.manifest["counts"]
        return {"path": str(self.path), "triples": c["triples"], "entries": c["entries"],
                "removed_entries": c["removed_entries"], "encoder": self.encoder_name, "dim": self.dim,
                "directions": self.manifest["directions"], "format_version": FORMAT_VERSION,
                "version": self.version, "segments": len(self.manifest["segments"]),
                "relations": len({k.split("\t", 1)[1] for k in self.manifest["relation_templates"]}),
                "bytes_on_disk": self.bytes_on_disk(), "created": self.manifest["created"],
                "index": self._index_info()}

    def _index_info(self) -> dict | None:
        ix = self.manifest.get("index")
        if not ix:
            return None
        return {"built_version": ix["built_version"], **ix["stats"],
                "added_since_build": int(sum(a["rows"] for a in ix["additions"]))}

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name)
        return self._encoder

    # ------------------------------------------------------------------ reading
    def removed_ids(self) -> np.ndarray:
        r = self.manifest["removed"]
        if not r:
            return np.zeros(0, np.int64)
        return np.load(self.path / r["file"], allow_pickle=False)

    def records(self, live_only: bool = True) -> pa.Table:
        """All entries as an Arrow table (id, head, relation, tail, masked, key_text, value_text, ...)."""
        tables = [pq.read_table(self.path / s["records"]) for s in self.manifest["segments"]]
        table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
        if live_only and self.manifest["removed"]:
            mask = ~np.isin(table.column("id").to_numpy(), self.removed_ids())
            table = table.filter(pa.array(mask))
        return table

    def triples(self) -> list[Triple]:
        t = self.records()
        seen, out = set(), []
        for h, r, tl in zip(*(t.column(c).to_pylist() for c in ("head", "relation", "tail"))):
            tr = Triple(h, r, tl)
            if tr not in seen:
                seen.add(tr)
                out.append(tr)
        return out

    def iter_segments(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, keys, values) per segment, embeddings memory-mapped (fp16); removed entries included."""
        for s in self.manifest["segments"]:
            ids = pq.read_table(self.path / s["records"], columns=["id"]).column("id").to_numpy()
            keys = np.load(self.path / s["keys"], mmap_mode="r", allow_pickle=False)
            values = np.load(self.path / s["values"], mmap_mode="r", allow_pickle=False)
            yield ids, keys, values

    def embeddings(self, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, keys, values) of live entries, in id order, as in-memory fp16 arrays (mmap: a single
        segment with nothing removed is returned memory-mapped, without copying)."""
        parts = list(self.iter_segments())
        if not parts:
            return np.zeros(0, np.int64), *(np.zeros((0, self.dim), np.float16),) * 2
        if mmap and len(parts) == 1 and not self.manifest["removed"]:
            return parts[0]
        ids = np.concatenate([p[0] for p in parts])
        keys = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
        live = ~np.isin(ids, self.removed_ids())
        return ids[live], keys[live], values[live]

    # ------------------------------------------------------------------ HiKVP index
    def build_index(self, show_progress: bool | None = None, **params) -> UpdateResult:
        """(Re)cluster the live entries into a fresh HiKVP tree (a new version; live adds are folded in)."""
        with self._write_lock():
            self._reload()
            table = EmbeddingTable(self)
            live = np.arange(len(table)) if table.live is None else np.flatnonzero(table.live)
            if len(live) == 0:
                raise KBError(f"{self.path}: the KB is empty; nothing to index")
            # memory-mapped rows, never the whole KB in memory (10^7 keys are 7.7 GB)
            ids, keys = table.ids[live], (table.keys if len(live) == len(table) else _Subset(table.keys, live))
            m = self._next_manifest()
            if m.get("index"):
                for rel in self._index_files(m["index"]):
                    m["files"].pop(rel, None)
            self._write_index(m, ids, keys, show_progress, **params)
            m["history"].append({"version": m["version"], "op": "index", **m["index"]["stats"]})
            self._commit(m)
            self._remove_orphans()
            return UpdateResult(version=self.version)

    def hierarchy(self):
        """The HiKVP tree over this version's entries (leaves = entry ids), live adds merged; None if unindexed."""
        from atlaskv.kb.index import Hierarchy

        ix = self.manifest.get("index")
        if not ix:
            return None
        if "hierarchy" not in self._cache:
            h = Hierarchy.load(self.path / "index", ix["stem"], mmap=True)
            if ix["additions"]:
                added = np.concatenate([np.load(self.path / a["file"], allow_pickle=False) for a in ix["additions"]])
                h = h.with_additions(added[:, 0], added[:, 1])
            self._cache["hierarchy"] = h
        return self._cache["hierarchy"]

    def table(self) -> "EmbeddingTable":
        """Every stored row (removed ones flagged), embeddings memory-mapped: what a pruned model reads."""
        if "table" not in self._cache:
            self._cache["table"] = EmbeddingTable(self)
        return self._cache["table"]

    @staticmethod
    def _index_files(ix: dict) -> list[str]:
        return [f"index/{f}" for f in ix["files"]] + [a["file"] for a in ix["additions"]]

    def _write_index(self, m: dict, ids: np.ndarray, keys: np.ndarray, show_progress: bool | None = None,
                     **params) -> None:
        from atlaskv.kb.index import build_hierarchy

        t0 = time.time()
        h = build_hierarchy(keys, progress=bool(show_progress), **params)
        h = h.map_leaves(lambda pos: np.asarray(ids, np.int64)[pos])  # on disk: entry ids, stable across adds
        (self.path / "index").mkdir(exist_ok=True)
        stem = f"hikvp-{m['version']:06d}"
        files = h.save(self.path / "index", stem)
        for f in files:
            m["files"][f"index/{f}"] = self._file_entry(f"index/{f}")
        m["index"] = {"stem": stem, "files": files, "built_version": m["version"], "additions": [],
                      "params": params, "stats": h.stats(), "seconds": round(time.time() - t0, 2)}

    def _place_in_index(self, m: dict, new_ids: np.ndarray, keys: np.ndarray) -> None:
        from atlaskv.kb.index import nearest_centroid

        inters = np.load(self.path / "index" / f"{m['index']['stem']}.inters.npy", allow_pickle=False)
        where = nearest_centroid(keys, inters)
        rel = f"index/add-{m['version']:06d}.npy"
        _write_npy(self.path / rel, np.stack([new_ids, where], 1).astype(np.int64))
        m["files"][rel] = self._file_entry(rel)
        m["index"]["additions"].append({"file": rel, "rows": int(len(new_ids))})

    # ------------------------------------------------------------------ updates
    def add(self, triples: Iterable[Triple] | str | Path | Sequence[str | Path], *, format: str | None = None,
            skip_bad: bool = False, batch_size: int = 256, show_progress: bool | None = None,
            encoder: str | None = None) -> UpdateResult:
        """Append triples live (no retraining, no re-index of what is stored). Known triples are skipped."""
        if encoder is not None and encoder != self.encoder_name:
            raise KBError(f"{self.path}: built with encoder {self.encoder_name!r}; refusing to mix "
                          f"embeddings from {encoder!r}")
        triples, report = _gather(triples, format, skip_bad)
        with self._write_lock():
            self._reload()
            existing = set(self._live_hashes().tolist())
            fresh, dup = [], report["duplicates"]
            for t in triples:
                h = triple_hash(t)
                if h in existing:
                    dup += 1
                else:
                    existing.add(h)
                    fresh.append(t)
            if not fresh:
                return UpdateResult(duplicates=dup, version=self.version)
            nouns = RelationNouns.from_json(self.manifest["relation_templates"])
            return self._append(fresh, nouns, batch_size, show_progress, duplicates=dup,
                                note={"op": "add", **report}, locked=True)

    def remove(self, triples: Iterable[Triple] | str | Path | Sequence[str | Path], *,
               format: str | None = None, skip_bad: bool = False) -> UpdateResult:
        """Tombstone every entry of the given triples; unknown triples are counted in `not_found`."""
        triples, _ = _gather(triples, format, skip_bad)
        with self._write_lock():
            self._reload()
            wanted = {triple_hash(t) for t in triples}
            table = self.records(live_only=True)
            hashes = table.column("triple_hash").to_numpy()
            hit = np.isin(hashes, np.fromiter(wanted, np.int64, len(wanted)))
            ids = table.column("id").to_numpy()[hit]
            found = set(hashes[hit].tolist())
            if len(ids) == 0:
                return UpdateResult(not_found=len(wanted), version=self.version)
            removed = np.union1d(self.removed_ids(), ids).astype(np.int64)
            m = self._next_manifest()
            rel = f"tombstones/removed-{m['version']:06d}.npy"
            (self.path / "tombstones").mkdir(exist_ok=True)
            _write_npy(self.path / rel, removed)
            old = m["removed"]["file"] if m["removed"] else None
            if old:
                m["files"].pop(old, None)
            m["removed"] = {"file": rel, "count": int(len(removed))}
            m["files"][rel] = self._file_entry(rel)
            m["counts"]["entries"] -= int(len(ids))
            m["counts"]["removed_entries"] = int(len(removed))
            m["counts"]["triples"] -= len(found)
            m["history"].append({"version": m["version"], "op": "remove", "triples": len(found),
                                 "entries": int(len(ids))})
            self._commit(m)
            self._remove_orphans()
            return UpdateResult(removed=len(found), not_found=len(wanted) - len(found), version=self.version)

    def compact(self) -> UpdateResult:
        """Rewrite live entries into one segment and drop tombstones (ids are kept)."""
        with self._write_lock():
            self._reload()
            table = self.records(live_only=True)
            ids, keys, values = self.embeddings()
            m = self._next_manifest()
            had_index = bool(m.get("index"))
            m["files"], m["segments"], m["removed"], m["index"] = {}, [], None, None
            if len(table):
                order = np.argsort(table.column("id").to_numpy(), kind="stable")
                table = table.take(pa.array(order))
                self._write_segment(m, table, keys, values)  # embeddings() is already in id order
                if had_index:  # re-cluster: live adds may have drifted away from the old centroids
                    self._write_index(m, ids, keys)
            m["counts"]["entries_total"] = m["counts"]["entries"]
            m["counts"]["removed_entries"] = 0
            m["history"].append({"version": m["version"], "op": "compact"})
            self._commit(m)
            self._remove_orphans()
            return UpdateResult(version=self.version)

    def verify(self) -> dict:
        """Check every file against its size and sha256 in the manifest, and row counts; raise KBError."""
        self._check_manifest()
        self._check_files(deep=True)
        self._check_tombstones()
        orphans = self._orphans()
        return {"ok": True, "version": self.version, "files": len(self.manifest["files"]),
                "orphans": [str(p.relative_to(self.path)) for p in orphans]}

    # ------------------------------------------------------------------ internals
    def _append(self, triples: list[Triple], nouns: RelationNouns, batch_size: int,
                show_progress: bool | None, duplicates: int = 0, note: dict | None = None,
                locked: bool = False, index: bool = False) -> UpdateResult:
        records = triples_to_records(triples, self.manifest["directions"], nouns)
        enc = self.encoder
        keys, values = encode_records(enc, records, batch_size, show_progress)
        return self._append_encoded(records, keys, values, len(triples), nouns, duplicates, note, locked, index)

    def add_encoded(self, records: list[KVRecord], keys: np.ndarray, values: np.ndarray,
                    index: bool = False) -> UpdateResult:
        """Append records whose embeddings were computed elsewhere (a distributed build, a benchmark's
        synthetic KB). The caller vouches for the encoder; shapes are checked. No dedupe."""
        if keys.shape != (len(records), self.dim) or values.shape != keys.shape:
            raise KBError(f"embeddings {keys.shape}/{values.shape} do not match {len(records)} records of dim {self.dim}")
        nouns = RelationNouns.from_json(self.manifest["relation_templates"])
        return self._append_encoded(records, keys, values, len({r.triple for r in records}), nouns,
                                    note={"op": "add_encoded"}, index=index)

    def _append_encoded(self, records: list[KVRecord], keys: np.ndarray, values: np.ndarray, n_triples: int,
                        nouns: RelationNouns, duplicates: int = 0, note: dict | None = None,
                        locked: bool = False, index: bool = False) -> UpdateResult:
        ctx = contextlib.nullcontext() if locked else self._write_lock()
        with ctx:
            m = self._next_manifest()
            start = m["next_id"]
            table = _records_table(records, start)
            self._write_segment(m, table, keys, values)
            new_ids = np.arange(start, start + len(records), dtype=np.int64)
            if m.get("index") and not index:  # live add: each new entry joins its nearest inter cluster
                self._place_in_index(m, new_ids, keys)
            m["next_id"] = start + len(records)
            m["counts"]["entries"] += len(records)
            m["counts"]["entries_total"] += len(records)
            m["counts"]["triples"] += n_triples
            m["relation_templates"] = nouns.to_json()
            m["history"].append({"version": m["version"], "op": (note or {}).get("op", "add"),
                                 "triples": n_triples, "entries": len(records),
                                 **{k: v for k, v in (note or {}).items() if k != "op"}})
            if index:  # a fresh KB: the tree over everything, committed in the same version
                self._write_index(m, new_ids, keys)
            self._commit(m)
            self._remove_orphans()
        return UpdateResult(added=n_triples, duplicates=duplicates, version=self.version)

    def _write_segment(self, m: dict, table: pa.Table, keys: np.ndarray, values: np.ndarray) -> None:
        if keys.shape != (table.num_rows, self.dim) or values.shape != keys.shape:
            raise KBError(f"embedding shape {keys.shape}/{values.shape} does not match "
                          f"{table.num_rows} records of dim {self.dim}")
        v = m["version"]
        (self.path / "segments").mkdir(exist_ok=True)
        seg = {"records": f"segments/seg-{v:06d}.records.parquet", "keys": f"segments/seg-{v:06d}.keys.f16.npy",
               "values": f"segments/seg-{v:06d}.values.f16.npy", "rows": table.num_rows,
               "first_id": int(table.column("id")[0].as_py())}
        with open(self.path / seg["records"], "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=1 << 16)  # citations read one group
            f.flush()
            os.fsync(f.fileno())
        _write_npy(self.path / seg["keys"], np.ascontiguousarray(keys, np.float16))
        _write_npy(self.path / seg["values"], np.ascontiguousarray(values, np.float16))
        for k in ("records", "keys", "values"):
            m["files"][seg[k]] = self._file_entry(seg[k])
        m["segments"].append(seg)

    def _file_entry(self, rel: str) -> dict:
        p = self.path / rel
        return {"bytes": p.stat().st_size, "sha256": _sha256(p)}

    def _next_manifest(self) -> dict:
        m = json.loads(json.dumps(self.manifest))
        m["version"] = self.version + 1
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return m

    def _commit(self, m: dict) -> None:
        for d in DATA_DIRS:
            if (self.path / d).is_dir():
                _fsync_dir(self.path / d)
        tmp = self.path / f".{MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(m, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)  # the commit point
        _fsync_dir(self.path)
        self.manifest = m
        self._cache.clear()

    def _reload(self) -> None:
        fresh = KnowledgeBase.open(self.path)
        self.manifest = fresh.manifest

    def _live_hashes(self) -> np.ndarray:
        return self.records(live_only=True).column("triple_hash").to_numpy()

    def _check_manifest(self) -> None:
        """A manifest is untrusted input too: every path it uses must be a file it lists (whose place
        _check_files then checks), and every count a plausible integer that agrees with the others."""
        mf = self.path / MANIFEST
        m = self.manifest

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
                from atlaskv.kb.index import ARRAYS

                for name in ARRAYS:
                    listed(f"index/{ix['stem']}.{name}.npy", "index file")
                for a in ix["additions"]:
                    listed(a["file"], "index addition")
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            fail(f"malformed manifest ({type(e).__name__}: {e})")

    def _check_tombstones(self) -> None:
        """The tombstone file holds as many ids as the manifest counts (after _check_files vouched for it)."""
        removed = self.manifest["removed"]
        if removed:
            p = self.path / removed["file"]
            ids = np.load(p, mmap_mode="r", allow_pickle=False)
            if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != removed["count"]:
                raise KBError(f"{p}: {ids.shape} {ids.dtype} ids, expected {removed['count']} int64 (removed.count)")

    def _check_files(self, deep: bool) -> None:
        rows = 0
        for rel, meta in self.manifest["files"].items():
            p = (self.path / rel).resolve()
            if self.path.resolve() not in p.parents:
                raise KBError(f"{self.path / MANIFEST}: file path {rel!r} escapes the KB directory")
            if not p.is_file():
                raise KBError(f"{p}: missing (listed in {MANIFEST} version {self.version})")
            if p.stat().st_size != meta["bytes"]:
                raise KBError(f"{p}: {p.stat().st_size} bytes, expected {meta['bytes']} (truncated or changed)")
            if deep and _sha256(p) != meta["sha256"]:
                raise KBError(f"{p}: checksum mismatch (the file is corrupt)")
        for s in self.manifest["segments"]:
            rows += s["rows"]
            if deep:
                n = pq.ParquetFile(self.path / s["records"]).metadata.num_rows
                for k in ("keys", "values"):
                    arr = np.load(self.path / s[k], mmap_mode="r", allow_pickle=False)
                    if arr.shape != (s["rows"], self.dim) or arr.dtype != np.float16:
                        raise KBError(f"{self.path / s[k]}: shape {arr.shape} {arr.dtype}, "
                                      f"expected ({s['rows']}, {self.dim}) float16")
                if n != s["rows"]:
                    raise KBError(f"{self.path / s['records']}: {n} rows, expected {s['rows']}")
        if rows != self.manifest["counts"]["entries_total"]:
            raise KBError(f"{self.path / MANIFEST}: segments hold {rows} entries, counts say "
                          f"{self.manifest['counts']['entries_total']}")

    def _orphans(self) -> list[Path]:
        listed = set(self.manifest["files"])
        out = []
        for d in DATA_DIRS:
            if (self.path / d).is_dir():
                out += [p for p in (self.path / d).iterdir() if f"{d}/{p.name}" not in listed]
        return out

    def _remove_orphans(self) -> None:
        for p in self._orphans():
            p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _write_lock(self):
        """One writer at a time per KB directory (readers never block)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KBError(f"{self.path}: another process is writing this KB") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r}, triples={len(self)}, version={self.version})"


class EmbeddingTable:
    """Every row of a KB version, addressed by position (segments in id order, removed rows flagged);
    embeddings stay memory-mapped and only the rows asked for are read."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        segs = kb.manifest["segments"]
        self.starts = np.cumsum([0] + [s["rows"] for s in segs])
        self._keys = [_random_access(np.load(kb.path / s["keys"], mmap_mode="r", allow_pickle=False)) for s in segs]
        self._values = [_random_access(np.load(kb.path / s["values"], mmap_mode="r", allow_pickle=False)) for s in segs]
        ranges = [_id_range(kb.path / s["records"]) for s in segs]
        self.firsts = np.asarray([lo for lo, _ in ranges], np.int64)
        # Appended segments hold consecutive ids, so id -> position is arithmetic and the 10^7-entry id
        # column never has to sit in memory; compacted segments (gaps where removed ids were) are read.
        dense = all(hi - lo == s["rows"] - 1 for (lo, hi), s in zip(ranges, segs))
        self._ids = None
        if not dense or np.any(self.firsts[1:] < self.firsts[:-1] + np.diff(self.starts)[:-1]):
            self._ids = np.concatenate([pq.read_table(kb.path / s["records"], columns=["id"]).column("id").to_numpy()
                                        for s in segs]) if segs else np.zeros(0, np.int64)
            if np.any(np.diff(self._ids) <= 0):
                raise KBError(f"{kb.path}: entry ids are not increasing across segments")
        removed = kb.removed_ids()
        self.live = None  # None: every row is live
        if len(removed):
            self.live = np.ones(len(self), bool)
            self.live[self.positions(np.sort(removed))] = False
        self.keys, self.values = _Rows(self, self._keys), _Rows(self, self._values)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def ids(self) -> np.ndarray:
        if self._ids is not None:
            return self._ids
        return np.concatenate([np.arange(f, f + n, dtype=np.int64) for f, n in zip(self.firsts, np.diff(self.starts))]
                              ) if len(self.firsts) else np.zeros(0, np.int64)

    @property
    def identity(self) -> bool:
        """Entry id == row position (one KB grown by appends from id 0): the index needs no id mapping."""
        return self._ids is None and np.array_equal(self.firsts, self.starts[:-1])

    def positions(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.empty(len(ids), np.int64)
        bad = False
        for s in range(0, len(ids), 1 << 20):  # chunks: no 10^7-long temporaries
            chunk = np.asarray(ids[s:s + (1 << 20)])
            if self._ids is not None:
                pos = np.searchsorted(self._ids, chunk)
                bad |= bool(len(chunk) and (pos.max() >= len(self._ids) or not np.array_equal(self._ids[pos], chunk)))
            else:
                seg = np.searchsorted(self.firsts, chunk, side="right") - 1
                local = chunk - self.firsts[np.maximum(seg, 0)]
                bad |= bool(len(chunk) and (seg.min() < 0 or np.any(local >= np.diff(self.starts)[seg])))
                pos = self.starts[np.maximum(seg, 0)] + local
            out[s:s + len(chunk)] = pos
        if bad:
            raise KBError(f"{self.kb.path}: the index names entries that are not stored (rebuild it: atlaskv kb index)")
        return out

    def triples(self, positions: np.ndarray) -> list[Triple]:
        """The triples at these positions, reading only the row groups that hold them."""
        return [Triple(*row) for row in self.columns(positions, ("head", "relation", "tail"))]

    def value_texts(self, positions: np.ndarray) -> list[str]:
        return [row[0] for row in self.columns(positions, ("value_text",))]

    def columns(self, positions: np.ndarray, names: tuple[str, ...]) -> list[tuple]:
        """Record fields at these positions, reading only the row groups that hold them."""
        out: dict[int, tuple] = {}
        positions = np.asarray(positions, np.int64)
        for si, seg in enumerate(self.kb.manifest["segments"]):
            lo, hi = self.starts[si], self.starts[si + 1]
            want = positions[(positions >= lo) & (positions < hi)]
            if not len(want):
                continue
            f = pq.ParquetFile(self.kb.path / seg["records"])
            bounds = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
            for g in np.unique(np.searchsorted(bounds, want - lo, side="right") - 1):
                t = f.read_row_group(int(g), columns=list(names))
                cols = [t.column(c).to_pylist() for c in names]
                for p in want[(want - lo >= bounds[g]) & (want - lo < bounds[g + 1])]:
                    r = int(p - lo - bounds[g])
                    out[int(p)] = tuple(c[r] for c in cols)
        return [out[int(p)] for p in positions]


def _check_build_target(out: str | Path, overwrite: bool) -> Path:
    """A build may write to `out` only if it is absent, empty, or (with overwrite) an existing KB."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise KBError(f"{out}: exists and is not empty (use overwrite=True / --overwrite)")
        if not (out / MANIFEST).is_file():
            raise KBError(f"{out}: refusing to overwrite a directory that is not a KB")
    return out


def _id_range(records: Path) -> tuple[int, int]:
    """(min, max) entry id of a records file, from the Parquet footer's statistics (no data read)."""
    meta = pq.ParquetFile(records).metadata
    col = meta.schema.names.index("id")
    stats = [meta.row_group(g).column(col).statistics for g in range(meta.num_row_groups)]
    if not stats or any(st is None or not st.has_min_max for st in stats):
        ids = pq.read_table(records, columns=["id"]).column("id").to_numpy()
        return (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)
    return min(int(st.min) for st in stats), max(int(st.max) for st in stats)


def _random_access(array: np.ndarray) -> np.ndarray:
    """Tell the kernel a memory map is read at random rows: without it every row read faults in the
    32 pages around it (read-around), which put 4 GB of a 10^7-entry KB into the process for one search."""
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return array


# Linux maps up to 64 KiB of already-cached pages around each faulting page (fault-around; MADV_RANDOM
# does not stop it), so a release covers that much on either side of the rows read.
_FAULT_AROUND = 64 * 1024
_READ_CHUNK = 256  # rows copied between two releases: bounds the mapped pages, and so the peak RSS


def _release(array: np.ndarray, lo: int, hi: int) -> None:
    """Drop rows lo..hi of a memory map (and the fault-around pages beside them) from this process once
    they are copied out: the pages stay in the kernel's page cache (shared, reclaimable; the next read of
    them is a minor fault), but they no longer count as this process's memory. Without it a 10^7-entry KB
    left 1.7 GB of touched pages in the RSS."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED") or hi <= lo:
        return
    row = array.strides[0]
    base = array.offset if hasattr(array, "offset") else 0
    start = max(0, base + lo * row - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(len(mm), base + hi * row + _FAULT_AROUND)
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Rows:
    """Rows of all segments as one [rows, d] array-like: slices and index arrays, read on demand."""

    def __init__(self, table: EmbeddingTable, arrays: list[np.ndarray]):
        self.table, self.arrays = table, arrays
        self.shape = (len(table), table.kb.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        return self.take(np.asarray(idx))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at `positions` (sorted reads per segment: sequential on the memory map)."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.table.kb.dim), np.float32)
        seg = np.searchsorted(self.table.starts, positions, side="right") - 1
        for s in np.unique(seg):
            at = np.flatnonzero(seg == s)
            local = positions[at] - self.table.starts[s]
            order = np.argsort(local)
            # copied and released a chunk at a time: with the KB in the page cache (just built, or read by
            # another process) each row read maps 64 KiB of neighbours, 0.4 GB for one search at 10^6 rows
            for c in range(0, len(order), _READ_CHUNK):
                o = order[c:c + _READ_CHUNK]
                out[at[o]] = self.arrays[s][local[o]]
                _release(self.arrays[s], int(local[o[0]]), int(local[o[-1]]) + 1)
        return out


class _Subset(_Rows):
    def __init__(self, rows: _Rows, positions: np.ndarray):
        self.rows, self.positions = rows, positions
        self.shape = (len(positions), rows.shape[1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.rows.take(self.positions[positions])


def _pid_alive(name: str) -> bool:
    """Whether the process whose pid ends a temp directory's name (".kb.building-1234") still runs."""
    try:
        os.kill(int(name.rsplit("-", 1)[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    """A finished build at `tmp` becomes `out`; an old KB there is moved aside first and deleted last
    (a kill between the two renames is undone by _recover_swap on the next open or build)."""
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_swap(out: Path) -> None:
    """A build with overwrite that was killed between its two renames left no KB at `out` and the old one
    at .<name>.replaced-<pid>: put the old one back (only when that build is dead)."""
    if out.exists() or not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if (old / MANIFEST).is_file() and not _pid_alive(old.name):
            with contextlib.suppress(OSError):
                os.rename(old, out)
                _fsync_dir(out.parent)
            return


def _remove_stale_temps(out: Path) -> None:
    """Temp directories of killed builds of `out` (never read, but they hold a whole KB's worth of files)."""
    for pattern in (f".{out.name}.building-*", f".{out.name}.replaced-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not _pid_alive(p.name) and (out.exists() or "building" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def _records_table(records: list[KVRecord], start_id: int) -> pa.Table:
    cols = {
        "id": np.arange(start_id, start_id + len(records), dtype=np.int64),
        "head": [r.triple.head for r in records], "relation": [r.triple.relation for r in records],
        "tail": [r.triple.tail for r in records], "masked": [r.masked for r in records],
        "key_text": [r.key_text for r in records], "value_text": [r.value_text for r in records],
        "triple_hash": np.array([triple_hash(r.triple) for r in records], dtype=np.int64),
    }
    return pa.table(cols, schema=RECORD_SCHEMA)


def _is_paths(sources) -> bool:
    if isinstance(sources, (str, Path)):
        return True
    return isinstance(sources, (list, tuple)) and len(sources) > 0 and all(
        isinstance(s, (str, Path)) for s in sources)


def _gather(sources, format, skip_bad) -> tuple[list[Triple], dict]:
    """Triples from files or an iterable, deduplicated, and a report for the manifest history."""
    if _is_paths(sources):
        rep = read_triples(sources, format, skip_bad=skip_bad)
        return rep.triples, {"rows": rep.n_rows, "bad": rep.n_bad, "duplicates": rep.n_duplicates}
    seen, out, dup = set(), [], 0
    for i, t in enumerate(sources):
        try:
            t = t if isinstance(t, Triple) else Triple(*t)
        except TypeError:
            raise KBError(f"item {i}: expected (head, relation, tail), got {t!r}") from None
        if not all(isinstance(x, str) and x.strip() for x in t):
            raise KBError(f"item {i}: every field of a triple must be a non-empty string, got {tuple(t)!r}")
        t = Triple(*(" ".join(x.split()) for x in t))
        if t in seen:
            dup += 1
            continue
        seen.add(t)
        out.append(t)
    return out, {"rows": len(out) + dup, "bad": 0, "duplicates": dup}


def _describe(sources) -> list[str] | str:
    if isinstance(sources, (str, Path)):
        return [str(sources)]
    if _is_paths(sources):
        return [str(s) for s in sources]
    return "python triples"
