"""KnowledgeBase: a KB directory, versioned, append/remove, crash-safe; build, open, update, verify.

The directory format and its durable-file helpers are layout.py; the read side that a model searches
(every row by position, embeddings memory-mapped) is table.EmbeddingTable, returned by `table()`.
Writers take the directory's lock, write new immutable files, and commit by replacing the manifest.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlaskv.kb import layout
from atlaskv.kb.encoder import LEGACY_EXACT_PASS, Encoder, encode_records, encoder_info, load_encoder
# KBError and triple_hash live in layout; importing them from here, as callers always have, still works.
from atlaskv.kb.layout import (FORMAT, FORMAT_VERSION, MANIFEST, RECORD_SCHEMA, KBError, file_entry,
                               records_table, triple_hash, write_npy)
from atlaskv.kb.triples import Triple, read_triples
from atlaskv.kb.records import DIRECTIONS, KVRecord, RelationNouns, triples_to_records
from atlaskv.kb.table import EmbeddingTable
from atlaskv.kb.view import KBView

RETIRED_SECONDS = 600  # how long files a segment merge replaced stay for readers of earlier versions
MERGE_AT = 16             # small segments at the KB's end (one per add) merged into one beyond this many
SMALL_SEGMENT = 10_000    # rows: a build's segments are left alone, only the adds' small ones are rewritten

# Build engines besides "local", by name: each is called with KnowledgeBase.build's arguments and returns
# the KnowledgeBase it built. ray_build registers "ray" when imported (atlaskv.kb's __init__ imports it):
# the engine depends on this module, never the other way round.
BUILD_ENGINES: dict[str, Callable[..., "KnowledgeBase"]] = {}


@dataclass(frozen=True)
class UpdateResult:
    added: int = 0
    removed: int = 0
    duplicates: int = 0
    not_found: int = 0
    version: int = 0


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
        kb = cls(path, layout.read_manifest(path))
        layout.check_manifest(path, kb.manifest)
        layout.check_files(path, kb.manifest, deep=verify)
        if verify:
            layout.check_tombstones(path, kb.manifest)
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
            "encoder": encoder_info(enc), "directions": directions,
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

        engine="ray" runs the same pipeline on Ray (atlaskv.kb.ray_build, registered in BUILD_ENGINES;
        `pip install 'atlaskv[ray]'`): `address` None/"local" (a local Ray instance), "auto" or
        "ray://host:port"; `ray_options` are ray_build.build's (actors, num_gpus_per_actor,
        num_cpus_per_actor, segment_rows, ...).
        """
        if engine != "local" and engine in BUILD_ENGINES:
            return BUILD_ENGINES[engine](sources, out, encoder=encoder, directions=directions, format=format,
                                         skip_bad=skip_bad, overwrite=overwrite, chat=chat, batch_size=batch_size,
                                         show_progress=show_progress, index=index, address=address, **ray_options)
        if engine != "local":
            raise KBError(f"engine must be 'local' or 'ray', got {engine!r}")
        if address is not None or ray_options:
            raise KBError(f"address / {sorted(ray_options) or 'options'} apply to engine='ray' only")
        out = layout.check_build_target(out, overwrite)
        triples, report = _gather(sources, format, skip_bad)
        if not triples:
            raise KBError(f"no triples to build a KB from ({describe_sources(sources)})")
        # Build beside the target and rename at the end: an interrupted build never looks like a KB at
        # `out`, and an overwritten KB stays intact until the new one is complete.
        out.parent.mkdir(parents=True, exist_ok=True)
        layout.recover_swap(out)
        layout.remove_stale_temps(out)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            nouns = RelationNouns(chat=chat)
            kb = cls.create(tmp, encoder, directions, nouns=nouns)
            kb._append(triples, nouns, batch_size, show_progress,
                       note={"op": "build", "sources": describe_sources(sources), **report}, index=index)
            layout.swap_into_place(tmp, out)
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
                "encoder_exact_pass": list(self.exact_pass), "directions": self.manifest["directions"],
                "format_version": FORMAT_VERSION,
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
    def exact_pass(self) -> tuple[int, int]:
        """The (tokens, rows) shape of the encoder passes this KB was built with; adds use it too, so an added
        fact's embedding has the bits a build would have given it."""
        return tuple(self.manifest["encoder"].get("exact_pass", LEGACY_EXACT_PASS))

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

    def records(self, live_only: bool = True, columns: Sequence[str] | None = None) -> pa.Table:
        """All entries as an Arrow table (id, head, relation, tail, masked, key_text, value_text, ...), or only
        `columns` of them (Parquet reads only those: at 10^6 entries the text columns are most of the bytes)."""
        filtered = live_only and bool(self.manifest["removed"])
        read = None if columns is None else list(dict.fromkeys([*columns, *(["id"] if filtered else [])]))
        tables = [pq.read_table(self.path / s["records"], columns=read) for s in self.manifest["segments"]]
        empty = RECORD_SCHEMA.empty_table()
        table = pa.concat_tables(tables) if tables else (empty if read is None else empty.select(read))
        if filtered:
            mask = ~np.isin(table.column("id").to_numpy(), self.removed_ids())
            table = table.filter(pa.array(mask))
        return table if columns is None else table.select(list(columns))

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
        from atlaskv.kb.index import write_index  # (index imports torch: only where a tree is built or read)

        with self._write_lock():
            self._reload()
            table = EmbeddingTable(self)
            live = np.arange(len(table)) if table.live is None else np.flatnonzero(table.live)
            if len(live) == 0:
                raise KBError(f"{self.path}: the KB is empty; nothing to index")
            # memory-mapped rows, never the whole KB in memory (10^7 keys are 7.7 GB)
            ids, keys = table.ids[live], (table.keys if len(live) == len(table) else table.keys.subset(live))
            m = self._next_manifest()
            if m.get("index"):
                for rel in self._index_files(m["index"]):
                    m["files"].pop(rel, None)
            write_index(self.path, m, ids, keys, show_progress, **params)
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

    def view(self) -> KBView:
        """What a model reads of this version (AtlasKV.kb_inputs): rows by position, the live mask, the tree
        with its leaves as row positions, and the triples behind cited rows."""
        return KBView.of(self)

    def table(self) -> EmbeddingTable:
        """Every stored row (removed ones flagged), embeddings memory-mapped: what a pruned model reads."""
        if "table" not in self._cache:
            self._cache["table"] = EmbeddingTable(self)
        return self._cache["table"]

    @staticmethod
    def _index_files(ix: dict) -> list[str]:
        return [f"index/{f}" for f in ix["files"]] + [a["file"] for a in ix["additions"]]

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
            hashes = [triple_hash(t) for t in triples]
            live = self.live_hashes()
            # which of the new ones are stored: a scan of the stored hashes for the few new ones (numpy's
            # other way round hashes all 10^6 stored ones: 0.8 s; a set of them: 0.1 s)
            stored = set(live[np.isin(live, np.asarray(hashes, np.int64))].tolist())
            fresh, dup, seen = [], report["duplicates"], set()
            for t, h in zip(triples, hashes):
                if h in stored or h in seen:
                    dup += 1
                else:
                    seen.add(h)
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
            table = self.records(live_only=True, columns=["id", "triple_hash"])
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
            write_npy(self.path / rel, removed)
            old = m["removed"]["file"] if m["removed"] else None
            if old:
                m["files"].pop(old, None)
            m["removed"] = {"file": rel, "count": int(len(removed))}
            m["files"][rel] = file_entry(self.path, rel)
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
            m.pop("retired", None)  # an offline rewrite: its orphans go now
            if len(table):
                order = np.argsort(table.column("id").to_numpy(), kind="stable")
                table = table.take(pa.array(order))
                layout.write_segment(self.path, m, table, keys, values, self.dim)  # embeddings() is in id order
                if had_index:  # re-cluster: live adds may have drifted away from the old centroids
                    from atlaskv.kb.index import write_index

                    write_index(self.path, m, ids, keys)
            m["counts"]["entries_total"] = m["counts"]["entries"]
            m["counts"]["removed_entries"] = 0
            m["history"].append({"version": m["version"], "op": "compact"})
            self._commit(m)
            self._remove_orphans()
            return UpdateResult(version=self.version)

    def merge_segments(self, keep: int = 1) -> UpdateResult:
        """Rewrite the segments after the first `keep` as one (an LSM-style minor compaction): every live add
        writes a segment, and a KB of hundreds of them reads hundreds of files per write and per snapshot
        (serving 1,000 mixed requests, the median add rose from 0.39 to 0.81 s: docs/serving.md). Ids,
        tombstones and the index stay as they are, so nothing is re-encoded or re-clustered; cheap when the
        merged segments are small. Adds run it themselves (_merge_small_segments). The merged-away
        files are retired, not deleted: a reader of an earlier version (an answer running on its snapshot)
        may still read their records; a later merge deletes them after RETIRED_SECONDS."""
        with self._write_lock():
            self._reload()
            self._merge_tail(keep)
            return UpdateResult(version=self.version)

    def _merge_small_segments(self) -> None:
        """Every add writes a segment: once more than MERGE_AT small ones (<= SMALL_SEGMENT rows) end the
        KB, merge them, so a KB grown by many adds (the server's live writes, `atlaskv kb add` in a loop) keeps
        reading few files. The caller holds the write lock."""
        segs = self.manifest["segments"]
        small = 0
        while small < len(segs) and segs[len(segs) - 1 - small]["rows"] <= SMALL_SEGMENT:
            small += 1
        if small > MERGE_AT:
            self._merge_tail(len(segs) - small)

    def _merge_tail(self, keep: int) -> None:
        segs = self.manifest["segments"]
        tail = segs[keep:]
        if len(tail) < 2:
            return
        table = pa.concat_tables([pq.read_table(self.path / t["records"]) for t in tail])
        keys, values = (np.concatenate([np.load(self.path / t[k], allow_pickle=False) for t in tail])
                        for k in ("keys", "values"))
        m = self._next_manifest()
        gone = [t[k] for t in tail for k in ("records", "keys", "values")]
        now = time.time()
        retired = {}
        for rel, at in (m.get("retired") or {}).items():  # gone for RETIRED_SECONDS: no reader is left
            parts = Path(rel).parts  # the manifest is untrusted: only a file in a data directory
            if len(parts) != 2 or parts[0] not in layout.DATA_DIRS or parts[1] in ("", ".", ".."):
                raise KBError(f"{self.path / MANIFEST}: retired file {rel!r} is not in a data directory")
            if now - float(at) > RETIRED_SECONDS:
                (self.path / rel).unlink(missing_ok=True)
            else:
                retired[rel] = at
        m["retired"] = {**retired, **{rel: now for rel in gone}}
        for rel in gone:
            m["files"].pop(rel)
        m["segments"] = segs[:keep]
        layout.write_segment(self.path, m, table, keys, values, self.dim)
        m["history"].append({"version": m["version"], "op": "merge", "segments": len(tail)})
        self._commit(m)
        self._remove_orphans()

    def verify(self) -> dict:
        """Check every file against its size and sha256 in the manifest, and row counts; raise KBError."""
        layout.check_manifest(self.path, self.manifest)
        layout.check_files(self.path, self.manifest, deep=True)
        layout.check_tombstones(self.path, self.manifest)
        orphans = layout.orphans(self.path, self.manifest)
        return {"ok": True, "version": self.version, "files": len(self.manifest["files"]),
                "orphans": [str(p.relative_to(self.path)) for p in orphans]}

    # ------------------------------------------------------------------ internals
    def _append(self, triples: list[Triple], nouns: RelationNouns, batch_size: int,
                show_progress: bool | None, duplicates: int = 0, note: dict | None = None,
                locked: bool = False, index: bool = False) -> UpdateResult:
        records = triples_to_records(triples, self.manifest["directions"], nouns)
        enc = self.encoder
        keys, values = encode_records(enc, records, batch_size, show_progress, exact_pass=self.exact_pass)
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
            table = records_table(records, start)
            layout.write_segment(self.path, m, table, keys, values, self.dim)
            new_ids = np.arange(start, start + len(records), dtype=np.int64)
            if m.get("index") and not index:  # live add: each new entry joins its nearest inter cluster
                from atlaskv.kb.index import place_additions

                place_additions(self.path, m, new_ids, keys)
            m["next_id"] = start + len(records)
            m["counts"]["entries"] += len(records)
            m["counts"]["entries_total"] += len(records)
            m["counts"]["triples"] += n_triples
            m["relation_templates"] = nouns.to_json()
            m["history"].append({"version": m["version"], "op": (note or {}).get("op", "add"),
                                 "triples": n_triples, "entries": len(records),
                                 **{k: v for k, v in (note or {}).items() if k != "op"}})
            if index:  # a fresh KB: the tree over everything, committed in the same version
                from atlaskv.kb.index import write_index

                write_index(self.path, m, new_ids, keys)
            self._commit(m)
            self._remove_orphans()
            self._merge_small_segments()
        return UpdateResult(added=n_triples, duplicates=duplicates, version=self.version)

    def _next_manifest(self) -> dict:
        m = json.loads(json.dumps(self.manifest))
        m["version"] = self.version + 1
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return m

    def _commit(self, m: dict) -> None:
        layout.write_manifest(self.path, m)
        self.manifest = m
        self._cache.clear()

    def _reload(self) -> None:
        fresh = KnowledgeBase.open(self.path)
        self.manifest = fresh.manifest

    def live_hashes(self) -> np.ndarray:
        """The triple hash of every live entry (int64; layout.triple_hash)."""
        return self.records(live_only=True, columns=["triple_hash"]).column("triple_hash").to_numpy()

    def _remove_orphans(self) -> None:
        for p in layout.orphans(self.path, self.manifest):
            p.unlink(missing_ok=True)

    def _write_lock(self):
        """One writer at a time per KB directory (readers never block)."""
        return layout.write_lock(self.path)

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r}, triples={len(self)}, version={self.version})"


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


def clean_triples(items: Iterable) -> tuple[list[Triple], int]:
    """In-memory (head, relation, tail) items as add() and remove() take them: checked (KBError names the
    bad item), whitespace collapsed, deduplicated; returns (triples, duplicates dropped)."""
    triples, report = _gather(list(items), None, False)
    return triples, report["duplicates"]


def describe_sources(sources) -> list[str] | str:
    """What a build read, for the manifest's history: the file names, or "python triples"."""
    if isinstance(sources, (str, Path)):
        return [str(sources)]
    if _is_paths(sources):
        return [str(s) for s in sources]
    return "python triples"
