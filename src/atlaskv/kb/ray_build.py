"""Build a KB on Ray (`atlaskv kb build ... --engine ray`): the local pipeline, spread over a cluster.

    read        one Ray task per input file (any format triples.py reads; shard big inputs into many files),
                with the same validation and file:line errors; the driver keeps 8 bytes per triple
                (its hash) to drop duplicates across files, first occurrence kept, as the local reader
    KG2KV +     Ray Data `map_batches` on an actor pool of encoders (CPU or GPU per actor); each batch of
    encoding    `segment_rows` triples becomes one segment of the KB directory, written by the actor
                itself (records Parquet + fp16 key/value .npy), so embeddings never pass the driver
    HiKVP       k-means on a sample (index.build_hierarchy: the same roots ▸ inter levels as the local
                build), then every leaf is assigned (nearest root, then nearest inter cluster under it) by
                one Ray task per segment; centroids become the means of their assigned members
    commit      one manifest, written last, in a hidden temporary directory that is renamed to `out`

The result is the local KB directory format (manifest version 1), only with several segments. Records
are identical to a local build's and embeddings fp16-equal: ids are global positions fixed before any
encoding, relation nouns are decided once on the driver, and `encode_exact` makes an embedding depend on
its text alone, not on how the texts were batched (tests/test_distributed.py checks all of it).

Failed tasks are retried by Ray (read and assignment tasks: `max_retries`, after a worker or node
dies; encoder actors: Ray Data restarts them and re-runs their batches); every file is written under a
temporary name and renamed, so a retried batch simply rewrites its segment. An exception raised by our
own code (a bad row, an encoder that cannot load) is not retried: it fails the build with its message. A build that fails leaves no KB at `out` (an existing one
stays as it was) and removes its temporary directory.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlaskv.kb.layout import (FORMAT, FORMAT_VERSION, KBError, check_build_target, file_entry, recover_swap,
                               records_table, remove_stale_temps, sha256, swap_into_place, triple_hash,
                               write_lock, write_manifest)
from atlaskv.kb.store import BUILD_ENGINES, KnowledgeBase, describe_sources

INSTALL_HINT = "the Ray engine needs Ray, which is not installed: pip install 'atlaskv[ray]'"
RETRIES = 3


def require_ray():
    """The `ray` module, or a KBError (one clean line in the CLI) that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pandas etc.)
    except ImportError:
        raise KBError(INSTALL_HINT) from None
    return ray


# ---------------------------------------------------------------------------------------------- tasks
def _read_shard(shard: int, path: str, fmt: str | None, skip_bad: bool):
    """One input file -> (Arrow table of its distinct triples with shard/row columns, small report)."""
    from atlaskv.kb.triples import KGFormatError, read_triples

    try:
        rep = read_triples(path, fmt, skip_bad=skip_bad)
    except KGFormatError as e:  # returned, not raised: the driver reports the first file's error, as local
        return pa.table({"shard": pa.array([], pa.int64())}), {"error": e}
    t = rep.triples
    table = pa.table({
        "shard": pa.array(np.full(len(t), shard, np.int64)), "row": pa.array(np.arange(len(t), dtype=np.int64)),
        "head": [x.head for x in t], "relation": [x.relation for x in t], "tail": [x.tail for x in t]})
    meta = {"rows": rep.n_rows, "bad": rep.n_bad, "duplicates": rep.n_duplicates,
            "hashes": np.fromiter((triple_hash(x) for x in t), np.int64, len(t)),
            "relations": sorted({x.relation for x in t})}
    return table, meta


def _write_file(path: Path, write: Callable) -> dict:
    """Write under a temporary name, fsync, rename (a retried task rewrites the same file); size + sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


class _EncodeSegments:
    """Ray Data actor: a batch of triples -> KG2KV records -> embeddings -> one segment on disk."""

    def __init__(self, encoder: str, device: str | None, cpus: float, templates: dict, sides: tuple,
                 offsets: np.ndarray, drops: dict, root: str, version: int, batch_size: int):
        import torch

        from atlaskv.kb.encoder import load_encoder
        from atlaskv.kb.records import RelationNouns

        torch.set_num_threads(max(1, int(cpus)))
        self.enc = load_encoder(encoder, device=device)
        self.nouns = RelationNouns(templates)  # every (side, relation) is in it: no LLM on the workers
        self.sides, self.offsets, self.drops = sides, offsets, drops
        self.root, self.version, self.batch_size = Path(root), version, batch_size

    def __call__(self, batch: pa.Table) -> dict:
        from atlaskv.kb.encoder import encode_records, encoder_info
        from atlaskv.kb.triples import Triple
        from atlaskv.kb.records import make_record

        shard = batch.column("shard").to_numpy()
        row = batch.column("row").to_numpy()
        keep = np.ones(len(row), bool)
        tid = self.offsets[shard] + row
        for s in np.unique(shard):  # triples dropped as duplicates of earlier files shift later ids
            d = self.drops.get(int(s))
            if d is not None and len(d):
                at = shard == s
                keep[at] = ~np.isin(row[at], d)
                tid[at] -= np.searchsorted(d, row[at])
        cols = [batch.column(c).to_pylist() for c in ("head", "relation", "tail")]
        triples = [Triple(h, r, t) for h, r, t, k in zip(*cols, keep) if k]
        tid = tid[keep]
        if not triples:
            return {"first_id": np.zeros(0, np.int64), "meta": np.zeros(0, object)}
        records = [make_record(t, s, self.nouns) for t in triples for s in self.sides]
        ids = (tid[:, None] * len(self.sides) + np.arange(len(self.sides))).reshape(-1)
        if np.any(np.diff(ids) != 1):
            raise RuntimeError(f"batch ids are not one contiguous range ({ids[:3]}...)")
        keys, values = encode_records(self.enc, records, self.batch_size, show_progress=False)
        first = int(ids[0])
        table = records_table(records, first)  # ids first, first + 1, ... (contiguous: checked above)
        stem = f"segments/seg-{self.version:06d}-{first:012d}"
        seg = {"records": f"{stem}.records.parquet", "keys": f"{stem}.keys.f16.npy",
               "values": f"{stem}.values.f16.npy", "rows": len(records), "first_id": first}
        files = {
            seg["records"]: _write_file(self.root / seg["records"], lambda f: pq.write_table(
                table, f, compression="zstd", row_group_size=1 << 16)),
            seg["keys"]: _write_file(self.root / seg["keys"], lambda f: np.save(
                f, np.ascontiguousarray(keys, np.float16), allow_pickle=False)),
            seg["values"]: _write_file(self.root / seg["values"], lambda f: np.save(
                f, np.ascontiguousarray(values, np.float16), allow_pickle=False)),
        }
        import resource

        meta = {"segment": seg, "files": files, "triples": len(triples),
                "encoder": encoder_info(self.enc),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        return {"first_id": np.array([first], np.int64), "meta": np.array([json.dumps(meta)], object)}


def _assign_segment(keys_path: str, roots: np.ndarray, inters: np.ndarray, root_offsets: np.ndarray,
                    root_children: np.ndarray):
    """Every leaf of one segment -> nearest root, then the nearest inter cluster under that root; with
    per-cluster member counts and float64 sums (the new centroids are means of what was assigned)."""
    from atlaskv.kb.index import assign, group_means

    x = np.load(keys_path, mmap_mode="r", allow_pickle=False)
    labels = np.empty(len(x), np.int64)
    for s in range(0, len(x), 1 << 16):
        chunk = np.asarray(x[s:s + (1 << 16)], np.float32)
        root_of = assign(chunk, roots)
        lab = labels[s:s + len(chunk)]
        for r in np.unique(root_of):
            at = np.flatnonzero(root_of == r)
            kids = root_children[root_offsets[r]:root_offsets[r + 1]]
            lab[at] = kids[assign(chunk[at], inters[kids])] if len(kids) > 1 else kids[0]
    present = np.unique(labels)
    dense = np.searchsorted(present, labels)
    _, counts, means = group_means(np.asarray(x, np.float32), dense, len(present))
    return labels, present, counts, means.astype(np.float64) * counts[:, None]


# ---------------------------------------------------------------------------------------------- driver
def build(sources: str | Path | Sequence[str | Path], out: str | Path, *, encoder: str | None = None,
          directions: str = "tail", format: str | None = None, skip_bad: bool = False,
          overwrite: bool = False, chat: Callable | None = None, batch_size: int = 256,
          show_progress: bool | None = None, index: bool = True, address: str | None = None,
          actors: int | None = None, num_cpus_per_actor: float = 1, num_gpus_per_actor: float = 0,
          segment_rows: int = 100_000, index_sample: int = 2_000_000, num_cpus: int | None = None,
          seed: int = 0):
    """`KnowledgeBase.build(..., engine="ray")`: see the module docstring.

    address: None or "local" starts a local Ray instance (num_cpus CPUs, default all) unless one is
    already running in this process; "auto" joins the cluster of this node; "ray://host:port" connects
    with Ray Client. The KB directory must be on storage that every node sees (a shared file system).
    actors: encoder actors (default: CPUs / num_cpus_per_actor, or GPUs / num_gpus_per_actor).
    segment_rows: triples per map_batches batch = per segment. index_sample: rows the HiKVP k-means
    sees (all of them when the KB is smaller; assignment always covers every leaf)."""
    from atlaskv.kb.encoder import DEFAULT_ENCODER
    from atlaskv.kb.records import RelationNouns

    ray = require_ray()
    paths, fmts, out = _check_inputs(sources, out, overwrite, directions, format, segment_rows, batch_size)
    encoder = getattr(encoder, "name", encoder) or DEFAULT_ENCODER  # actors load it by name
    started = _connect(ray, address, num_cpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out)
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        (tmp / "segments").mkdir(parents=True)
        timings = {}
        # ---- read: one task per file
        tables, metas, offsets, drops, n_triples, report = _read_all(ray, paths, fmts, skip_bad)
        if n_triples == 0:
            raise KBError(f"no triples to build a KB from ({describe_sources(sources)})")
        # ---- relation nouns, once, on the driver (rules, or the LLM for relations the rules do not know)
        sides = ("tail", "head") if directions == "both" else (directions,)
        nouns = RelationNouns(chat=chat)
        for rel in sorted({r for m in metas for r in m["relations"]}):
            for s in sides:
                nouns.template(rel, s)
        timings["read_s"] = round(time.time() - t0, 2)

        # ---- KG2KV + encoding + segment writing: Ray Data map_batches on an encoder actor pool
        t1 = time.time()
        metas_out, actors = _encode_all(
            ray, tables, n_triples, actors=actors, segment_rows=segment_rows, num_cpus_per_actor=num_cpus_per_actor,
            num_gpus_per_actor=num_gpus_per_actor, show_progress=show_progress, actor_kwargs=dict(
                encoder=encoder, device="cuda" if num_gpus_per_actor else None,
                cpus=num_cpus_per_actor, templates=nouns.cache, sides=sides, offsets=offsets, drops=drops,
                root=str(tmp), version=1, batch_size=batch_size))
        timings["encode_s"] = round(time.time() - t1, 2)
        m = _manifest(metas_out, n_triples * len(sides), n_triples, directions, nouns)
        m["history"].append({"version": 1, "op": "build", "triples": n_triples, "entries": m["next_id"],
                             "sources": describe_sources(sources), **report, "engine": "ray"})
        # ---- HiKVP: sampled k-means + distributed assignment
        if index:
            t2 = time.time()
            _write_index(ray, tmp, m, index_sample, seed, show_progress)
            timings["index_s"] = round(time.time() - t2, 2)
        m["history"][-1]["ray"] = {"actors": actors, "segments": len(m["segments"]), "segment_rows": segment_rows,
                                   "num_gpus_per_actor": num_gpus_per_actor, **timings,
                                   "actor_peak_rss_mb": max(x.get("peak_rss_mb", 0) for x in metas_out)}
        with write_lock(tmp):
            write_manifest(tmp, m)  # the manifest, last: before this line the directory is not a KB
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return KnowledgeBase.open(out)


def _check_inputs(sources, out, overwrite: bool, directions: str, format: str | None, segment_rows: int,
                  batch_size: int) -> tuple[list[str], list[str], Path]:
    """(paths, their formats, out) once every argument and input file is checked, before any work is sent out."""
    from atlaskv.kb.triples import check_file, detect_format
    from atlaskv.kb.records import DIRECTIONS

    if not isinstance(sources, (str, Path)) and not (
            isinstance(sources, (list, tuple)) and sources and all(isinstance(s, (str, Path)) for s in sources)):
        raise KBError("the Ray engine reads triple files (give paths); build from Python triples with engine='local'")
    if directions not in DIRECTIONS:
        raise KBError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    if segment_rows < 1 or batch_size < 1:
        raise KBError("segment_rows and batch_size must be positive")
    paths = [str(p) for p in ([sources] if isinstance(sources, (str, Path)) else sources)]
    out = check_build_target(out, overwrite)
    fmts = []
    for p in paths:  # every file checked before any work is sent out, as the local reader does
        check_file(p)
        fmts.append(detect_format(p, format))
    return paths, fmts, out


def _read_all(ray, paths: list[str], fmts: list[str], skip_bad: bool):
    """Every file read by its own task; the first occurrence of each triple kept, in file order.

    Returns (Arrow table refs, per-file metas, id offset of each file's first kept triple, {file: rows
    dropped as duplicates of earlier files}, triples kept, report for the manifest history)."""
    read = ray.remote(num_returns=2, max_retries=RETRIES)(_read_shard)
    refs = [read.remote(i, p, f, skip_bad) for i, (p, f) in enumerate(zip(paths, fmts))]
    tables, metas = [r[0] for r in refs], _get(ray, [r[1] for r in refs])
    for meta in metas:
        if "error" in meta:
            raise meta["error"]
    hashes = np.concatenate([m["hashes"] for m in metas]) if metas else np.zeros(0, np.int64)
    keep = np.zeros(len(hashes), bool)
    keep[np.unique(hashes, return_index=True)[1]] = True  # first occurrence of each triple, in file order
    sizes = np.array([len(m["hashes"]) for m in metas], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    kept = np.array([keep[starts[i]:starts[i + 1]].sum() for i in range(len(metas))], np.int64)
    offsets = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64)
    drops = {i: np.flatnonzero(~keep[starts[i]:starts[i + 1]]) for i in range(len(metas))
             if kept[i] < sizes[i]}
    n_triples = int(kept.sum())
    report = {"rows": sum(m["rows"] for m in metas), "bad": sum(m["bad"] for m in metas),
              "duplicates": sum(m["duplicates"] for m in metas) + int(len(hashes) - n_triples)}
    return tables, metas, offsets, drops, n_triples, report


def _encode_all(ray, tables: list, n_triples: int, *, actors: int | None, segment_rows: int,
                num_cpus_per_actor: float, num_gpus_per_actor: float, show_progress: bool | None,
                actor_kwargs: dict) -> tuple[list[dict], int]:
    """map_batches of `segment_rows` triples over an _EncodeSegments actor pool: (the segments' metas
    in id order, actors used)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches of consecutive triples: contiguous id ranges
    ctx.enable_progress_bars = bool(show_progress) if show_progress is not None else ctx.enable_progress_bars
    ctx.print_on_execution_start = bool(show_progress)
    if actors is None:
        res = ray.cluster_resources()
        actors = int(res.get("GPU", 0) // num_gpus_per_actor) if num_gpus_per_actor else \
            int(res.get("CPU", 1) // max(num_cpus_per_actor, 1e-9))
    actors = max(1, min(int(actors), -(-n_triples // segment_rows)))
    # Ray Data restarts a dead actor (max_restarts=-1) and retries its batches; an exception in our
    # code (a bad encoder, a full disk) fails the build instead of looping.
    ds = ray.data.from_arrow_refs(tables).map_batches(
        _EncodeSegments, batch_size=segment_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None,
        fn_constructor_kwargs=actor_kwargs)
    try:
        rows = ds.take_all()
    except Exception as e:
        raise _unwrap(ray, e) from None
    return sorted((json.loads(r["meta"]) for r in rows), key=lambda x: x["segment"]["first_id"]), actors


def _manifest(metas_out: list[dict], entries: int, n_triples: int, directions: str, nouns) -> dict:
    """Version 1 of the KB over the segments the actors wrote (checked: one encoder, ids 0.. contiguous)."""
    encs = {json.dumps(x["encoder"], sort_keys=True) for x in metas_out}
    if len(encs) != 1:
        raise KBError(f"encoder actors disagree on the encoder: {sorted(encs)}")
    enc_info = metas_out[0]["encoder"]
    segments, files, at = [], {}, 0
    for x in metas_out:
        if x["segment"]["first_id"] != at:
            raise KBError(f"segments do not cover ids contiguously (expected {at}, got {x['segment']['first_id']})")
        at += x["segment"]["rows"]
        segments.append(x["segment"])
        files.update(x["files"])
    if at != entries:
        raise KBError(f"segments hold {at} entries, expected {entries}")

    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": 1,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "encoder": enc_info,
         "directions": directions, "next_id": at, "segments": segments, "removed": None, "files": files,
         "counts": {"entries": at, "triples": n_triples, "entries_total": at, "removed_entries": 0},
         "relation_templates": nouns.to_json(), "history": [], "index": None}
    m["updated"] = m["created"]
    return m


def _connect(ray, address: str | None, num_cpus: int | None) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down at the end)."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                        "TOKENIZERS_PARALLELISM": "false"}}
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=env)
    return True


def _unwrap(ray, e: BaseException) -> BaseException:
    """A task's own error (bad row, encoder, KB) instead of Ray's wrapper with a remote traceback."""
    from atlaskv.kb.encoder import EncoderError
    from atlaskv.kb.triples import KGFormatError

    ours = (KGFormatError, EncoderError, KBError)
    seen, todo = set(), [e]
    while todo:  # Ray wraps a task's exception (cause, __cause__, __context__), sometimes twice
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ours) and not isinstance(x, ray.exceptions.RayError):
            return x  # (Ray's own copies of a cause also derive from RayError; their text holds a traceback)
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    if isinstance(e, ray.exceptions.RayError):
        return KBError(f"the Ray build failed: {str(e).strip().splitlines()[-1][:500]}")
    return e


def _get(ray, refs):
    try:
        return ray.get(refs)
    except Exception as e:
        raise _unwrap(ray, e) from None


def _write_index(ray, root: Path, m: dict, sample_size: int, seed: int, show_progress) -> None:
    """HiKVP levels from index.build_hierarchy on a sample; leaves assigned by one Ray task per segment."""
    from atlaskv.kb.index import Hierarchy, build_hierarchy, default_sizes

    t0 = time.time()
    segs = m["segments"]
    total = int(sum(s["rows"] for s in segs))
    seg_start = np.concatenate([[0], np.cumsum([s["rows"] for s in segs])])
    rng = np.random.default_rng(seed)
    pos = np.arange(total) if sample_size >= total else np.sort(rng.choice(total, sample_size, replace=False))
    parts = []
    for i, s in enumerate(segs):  # the sample, read from the memory-mapped segments
        want = pos[(pos >= seg_start[i]) & (pos < seg_start[i + 1])] - seg_start[i]
        if len(want):
            parts.append(np.asarray(np.load(root / s["keys"], mmap_mode="r", allow_pickle=False)[want], np.float32))
    sample = np.concatenate(parts)
    n_roots, n_inter = default_sizes(total)  # sized for the whole KB, as a local build
    h = build_hierarchy(sample, n_roots=n_roots, n_inter=n_inter, seed=seed, progress=bool(show_progress))
    arrays = [ray.put(a) for a in (h.roots, h.inters, h.root_offsets, h.root_children)]
    task = ray.remote(max_retries=RETRIES)(_assign_segment)
    refs = [task.remote(str(root / s["keys"]), *arrays) for s in segs]
    n_i = len(h.inters)
    labels = np.empty(total, np.int64)
    counts = np.zeros(n_i, np.int64)
    sums = np.zeros((n_i, h.inters.shape[1]), np.float64)
    for i, ref in enumerate(refs):  # one result at a time: the driver never holds every segment's sums
        lab, present, c, sm = _get(ray, ref)
        labels[seg_start[i]:seg_start[i + 1]] = lab
        counts[present] += c
        sums[present] += sm
        refs[i] = None
    inters = h.inters.copy()  # an inter cluster that lost every member keeps its sample centroid
    nz = counts > 0
    inters[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
    inter_root = np.repeat(np.arange(len(h.roots)), np.diff(h.root_offsets))[np.argsort(h.root_children)]
    root_counts = np.bincount(inter_root, weights=counts, minlength=len(h.roots))
    root_sums = np.zeros((len(h.roots), sums.shape[1]), np.float64)
    np.add.at(root_sums, inter_root, sums)
    roots = h.roots.copy()
    rz = root_counts > 0
    roots[rz] = (root_sums[rz] / root_counts[rz, None]).astype(np.float32)
    ids = np.arange(total, dtype=np.int64)  # a fresh build: entry id = position
    order = np.argsort(labels, kind="stable")
    inter_offsets = np.zeros(n_i + 1, np.int64)
    np.cumsum(counts, out=inter_offsets[1:])
    tree = Hierarchy(roots, inters, h.root_offsets, h.root_children, inter_offsets, ids[order])
    (root / "index").mkdir(exist_ok=True)
    stem = f"hikvp-{m['version']:06d}"
    names = tree.save(root / "index", stem)
    for f in names:
        m["files"][f"index/{f}"] = file_entry(root, f"index/{f}")
    stats = tree.stats()
    stats["empty_inters"] = int((~nz).sum())
    m["index"] = {"stem": stem, "files": names, "built_version": m["version"], "additions": [],
                  "params": {}, "stats": stats, "seconds": round(time.time() - t0, 2),
                  "engine": "ray", "sample": int(len(sample))}


BUILD_ENGINES["ray"] = build  # KnowledgeBase.build(..., engine="ray") (store never imports this module)
