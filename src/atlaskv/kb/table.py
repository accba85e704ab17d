"""The read side of a KB version: every stored row by position, embeddings memory-mapped.

`EmbeddingTable` is what a pruned model reads (KnowledgeBase.table()): segments in id order as one table,
removed rows flagged, entry id <-> row position, and records fetched by position reading only the Parquet
row groups that hold them. Its `keys` / `values` are array-likes over the memory-mapped fp16 segments that
copy out only the rows asked for (as float32) and release the pages again, so a search over a 10^7-entry
KB never holds the KB in memory.
"""
from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlaskv.kb.layout import KBError
from atlaskv.kb.triples import Triple


class EmbeddingTable:
    """Every row of a KB version, addressed by position (segments in id order, removed rows flagged);
    embeddings stay memory-mapped and only the rows asked for are read."""

    def __init__(self, kb):  # a store.KnowledgeBase (not imported here: store imports this module)
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
        """Record fields at these positions, reading only the row groups that hold them (kept decoded for
        the next call: row_groups)."""
        out: dict[int, tuple] = {}
        positions = np.asarray(positions, np.int64)
        for si, seg in enumerate(self.kb.manifest["segments"]):
            lo, hi = self.starts[si], self.starts[si + 1]
            want = np.unique(positions[(positions >= lo) & (positions < hi)]) - lo
            if not len(want):
                continue
            path = self.kb.path / seg["records"]
            bounds = row_groups.bounds(path)
            group = np.searchsorted(bounds, want, side="right") - 1
            for g in np.unique(group):
                local = want[group == g]
                cols = [c.take(pa.array(local - bounds[g])).to_pylist() for c in row_groups.read(path, int(g), names)]
                for i, p in enumerate(local + lo):
                    out[int(p)] = tuple(c[i] for c in cols)
        return [out[int(p)] for p in positions]


class RowGroupCache:
    """Decoded Parquet row groups of records files, shared by every KB version of the process, newest kept
    up to `max_bytes`. A prefill reads the fields of a few hundred scattered rows (citations, the kept
    entries' values), so each call used to decode the same 64Ki-row groups again: 159 group reads and
    their conversion to Python took 1.4 s of a 3.7 s prefill of 8 questions at 10^6 entries
    (benchmarks/profile_batching.py). A records file is never rewritten in place (a new version writes new
    files), and the key holds its size and mtime besides, so an entry cannot outlive its file's content."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.groups: OrderedDict[tuple, list[pa.ChunkedArray]] = OrderedDict()
        self.nbytes = 0
        self.meta: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @staticmethod
    def _file_key(path: Path) -> tuple:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns

    def bounds(self, path: Path) -> np.ndarray:
        """Row offsets of the file's row groups ([0, n0, n0 + n1, ...]), from its footer."""
        key = self._file_key(path)
        with self.lock:
            if key in self.meta:
                self.meta.move_to_end(key)
                return self.meta[key]
        meta = pq.ParquetFile(path).metadata
        b = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        with self.lock:
            self.meta[key] = b
            while len(self.meta) > 1024:
                self.meta.popitem(last=False)
        return b

    def read(self, path: Path, group: int, names: tuple[str, ...]) -> list[pa.ChunkedArray]:
        key = (*self._file_key(path), group, tuple(names))
        with self.lock:
            if key in self.groups:
                self.groups.move_to_end(key)
                return self.groups[key]
        t = pq.ParquetFile(path).read_row_group(group, columns=list(names))
        cols = [t.column(c) for c in names]
        size = sum(c.nbytes for c in cols)
        with self.lock:
            if key not in self.groups and size <= self.max_bytes:
                self.groups[key] = cols
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, old = self.groups.popitem(last=False)
                    self.nbytes -= sum(c.nbytes for c in old)
        return cols


row_groups = RowGroupCache()


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

    def subset(self, positions: np.ndarray) -> "_Rows":
        """These rows only (row i of the subset is row positions[i]), read on demand as well."""
        return _Subset(self, positions)


class _Subset(_Rows):
    def __init__(self, rows: _Rows, positions: np.ndarray):
        self.rows, self.positions = rows, positions
        self.shape = (len(positions), rows.shape[1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.rows.take(self.positions[positions])
