"""HiKVP hierarchy: roots ▸ inter clusters ▸ leaves over one KB's key embeddings (method.md §5).

Built top-down so that it scales: faiss k-means on a sample picks ~M^(1/3) roots and every key goes to
its nearest root in streaming chunks; then each root's members are clustered into a share of the
~M^(2/3) inter clusters proportional to the root's size, which keeps inter clusters near M^(1/3) leaves
even when roots are uneven. That is two passes of M x M^(1/3) distances instead of one flat k-means with
M^(2/3) centroids (the reference: UMAP + full-covariance GMM, infeasible past ~10^6).

Centroids are means of member base embeddings (roots: of all their leaves) in the encoder's space; the
adapter projects them like any key at query time (method.md §5.2). Children are CSR arrays (offsets +
ids). Leaves are row positions 0..M-1 of the served KB; the store maps them to entry ids on disk, so the
reference's id-mapping bugs (§5.5) have nowhere to live: local id = global id.

In a KB directory (layout.py): write_index saves a tree as index/hikvp-<version>.*.npy and enters it in
the manifest; place_additions files live adds under their nearest inter cluster until the next rebuild.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlaskv.kb.layout import ARRAYS, file_entry, write_npy


@dataclass
class Hierarchy:
    roots: np.ndarray           # [R, d] float32, base-space centroids
    inters: np.ndarray          # [I, d] float32
    root_offsets: np.ndarray    # [R + 1] int64: root r owns root_children[root_offsets[r]:root_offsets[r+1]]
    root_children: np.ndarray   # [I] int64 inter ids
    inter_offsets: np.ndarray   # [I + 1] int64
    inter_children: np.ndarray  # [M] int64 leaves (row positions, or entry ids on disk)

    @property
    def num_leaves(self) -> int:
        return len(self.inter_children)

    def stats(self) -> dict:
        inter_sizes = np.diff(self.inter_offsets)
        cum = np.concatenate([[0], np.cumsum(inter_sizes[self.root_children])])
        root_sizes = cum[self.root_offsets[1:]] - cum[self.root_offsets[:-1]]
        m = max(1, self.num_leaves)
        return {"roots": len(self.roots), "inters": len(self.inters), "leaves": self.num_leaves,
                "largest_root_share": round(float(root_sizes.max()) / m, 4),
                "largest_inter": int(inter_sizes.max(initial=0)), "mean_inter": round(m / max(1, len(self.inters)), 1)}

    def with_additions(self, leaves: np.ndarray, inter: np.ndarray) -> "Hierarchy":
        """New leaves placed under given inter clusters (live adds); centroids stay as they are."""
        if len(leaves) == 0:
            return self
        parent = np.repeat(np.arange(len(self.inters)), np.diff(self.inter_offsets))
        parent = np.concatenate([parent, inter.astype(np.int64)])
        children = np.concatenate([self.inter_children, leaves.astype(np.int64)])
        order = np.argsort(parent, kind="stable")
        offsets = np.zeros(len(self.inters) + 1, np.int64)
        np.cumsum(np.bincount(parent, minlength=len(self.inters)), out=offsets[1:])
        return Hierarchy(self.roots, self.inters, self.root_offsets, self.root_children, offsets, children[order])

    def map_leaves(self, fn) -> "Hierarchy":
        return Hierarchy(self.roots, self.inters, self.root_offsets, self.root_children, self.inter_offsets,
                         fn(self.inter_children))

    def save(self, folder: Path, stem: str) -> list[str]:
        """One .npy per array (memory-mappable, no pickle); returns the file names written."""
        names = []
        for name in ARRAYS:
            arr = getattr(self, name)
            fname = f"{stem}.{name}.npy"
            write_npy(folder / fname, np.ascontiguousarray(arr))
            names.append(fname)
        return names

    @classmethod
    def load(cls, folder: Path, stem: str, mmap: bool = False) -> "Hierarchy":
        """mmap: arrays stay on disk and a search reads only the CSR ranges it visits (10^7 leaves: 80 MB)."""
        mode = "r" if mmap else None
        return cls(*(np.load(folder / f"{stem}.{name}.npy", mmap_mode=mode, allow_pickle=False) for name in ARRAYS))


# ---------------------------------------------------------------------------------------------- building
def _sample(x, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(x):
        return np.asarray(x[0:len(x)], np.float32)  # a slice: x may be a memory map or the store's row view
    idx = np.sort(rng.choice(len(x), n, replace=False))
    return np.asarray(x[idx], np.float32)


@contextlib.contextmanager
def _faiss_threads(work: float):
    """faiss's OpenMP threads cost far more than they save on small problems (25x slower k-means on
    2,000 points here), so small jobs run on one thread."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if work < 5e8 else before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    import faiss

    if k >= len(x):
        return x.copy()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 30)
    with _faiss_threads(float(len(x)) * k * x.shape[1]):
        km.train(np.ascontiguousarray(x, np.float32))
    return km.centroids


def assign(x, centroids: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """Nearest centroid (L2) of every row, streaming over x (which may be a memory map)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    out = np.empty(len(x), np.int64)
    with _faiss_threads(float(min(len(x), chunk)) * len(centroids) * centroids.shape[1]):
        for s in range(0, len(x), chunk):
            out[s:s + chunk] = index.search(np.ascontiguousarray(x[s:s + chunk], np.float32), 1)[1][:, 0]
    return out


def group_means(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, counts, means) of rows grouped by label (order sorts rows by label, stable)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, x.shape[1]), np.float64)
    nz = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if len(x):
        sums[nz] = np.add.reduceat(x[order].astype(np.float64), starts[nz], axis=0)
    return order, counts, (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def default_sizes(m: int) -> tuple[int, int]:
    """(#roots, #inter) = (ceil M^(1/3), ceil M^(2/3)) as in the paper, capped by M."""
    roots = max(1, math.ceil(round(m ** (1 / 3), 9)))
    return min(roots, m), min(max(roots, math.ceil(round(m ** (2 / 3), 9))), m)


def build_hierarchy(keys, n_roots: int | None = None, n_inter: int | None = None, seed: int = 0,
                    niter: int = 15, points_per_centroid: int = 48, progress: bool = False) -> Hierarchy:
    """Cluster M key embeddings ([M, d], any float dtype, may be memory-mapped) into a 3-level tree."""
    from tqdm.auto import tqdm

    m, d = keys.shape
    if m == 0:
        raise ValueError("cannot index an empty KB")
    r_default, i_default = default_sizes(m)
    n_roots = min(n_roots or r_default, m)
    n_inter = min(max(n_inter or i_default, n_roots), m)
    rng = np.random.default_rng(seed)
    root_c = _kmeans(_sample(keys, n_roots * points_per_centroid, rng), n_roots, seed, niter)
    root_of = assign(keys, root_c)
    by_root = np.argsort(root_of, kind="stable")          # positions grouped by root, ascending within
    root_counts = np.bincount(root_of, minlength=len(root_c))
    live = np.flatnonzero(root_counts)
    # inter clusters per root, proportional to its size, at least one, never more than its members
    share = np.maximum(1, np.round(root_counts[live] / m * n_inter)).astype(np.int64)
    share = np.minimum(share, root_counts[live])

    roots, inters, root_sizes, inter_children, inter_sizes = [], [], [], [], []
    starts = np.concatenate([[0], np.cumsum(root_counts)])
    for r, k in tqdm(list(zip(live, share)), desc="HiKVP inter clusters", disable=not progress):
        members = by_root[starts[r]:starts[r + 1]]
        x = np.asarray(keys[members], np.float32)
        if k == 1:
            labels = np.zeros(len(x), np.int64)
        else:
            c = _kmeans(_sample(x, k * points_per_centroid, rng), int(k), seed, niter)
            labels = assign(x, c)
        labels = _split_oversized(x, labels, m / n_inter, seed, niter)
        k = int(labels.max()) + 1
        order, counts, means = group_means(x, labels, int(k))
        keep = counts > 0
        inters.append(means[keep])
        inter_sizes.append(counts[keep])
        inter_children.append(members[order])
        root_sizes.append(int(keep.sum()))
        roots.append(x.mean(0, dtype=np.float64).astype(np.float32))
    root_offsets = np.zeros(len(roots) + 1, np.int64)
    np.cumsum(root_sizes, out=root_offsets[1:])
    inter_sizes = np.concatenate(inter_sizes)
    inter_offsets = np.zeros(len(inter_sizes) + 1, np.int64)
    np.cumsum(inter_sizes, out=inter_offsets[1:])
    return Hierarchy(np.stack(roots), np.concatenate(inters), root_offsets, np.arange(root_offsets[-1]),
                     inter_offsets, np.concatenate(inter_children).astype(np.int64))


def _split_oversized(x: np.ndarray, labels: np.ndarray, target: float, seed: int, niter: int,
                     factor: float = 4.0) -> np.ndarray:
    """Split clusters over factor x target members: dense regions otherwise collect giant clusters that
    the search keeps selecting (at 10^7 synthetic keys: 24x the mean), and every leaf of a kept cluster is
    read. Sub-k-means first, then cuts along the principal direction, so every cluster ends <= the cap."""
    cap = max(8, int(factor * target))
    counts = np.bincount(labels)
    if counts.max() <= cap:
        return labels
    labels = labels.copy()
    next_label = len(counts)
    for c in np.flatnonzero(counts > cap):
        idx = np.flatnonzero(labels == c)
        pieces = math.ceil(len(idx) / target)
        sub = assign(x[idx], _kmeans(x[idx], pieces, seed, niter))
        for s_label in np.unique(sub):
            part = idx[sub == s_label]
            if len(part) > cap:  # still too big: equal cuts along the part's principal direction
                y = x[part] - x[part].mean(0)
                v = np.linalg.svd(y[:2048], full_matrices=False)[2][0]
                part = part[np.argsort(y @ v)]
                chunks = np.array_split(part, math.ceil(len(part) / target))
            else:
                chunks = [part]
            for chunk in chunks:
                labels[chunk] = next_label
                next_label += 1
    # renumber densely (the original labels of split clusters are now unused)
    return np.unique(labels, return_inverse=True)[1]


def nearest_centroid(x, centroids: np.ndarray) -> np.ndarray:
    """Where live adds go: the inter cluster with the nearest centroid."""
    return assign(x, centroids)


# ---------------------------------------------------------------------------------------------- in a KB directory
def write_index(root: Path, m: dict, ids: np.ndarray, keys, show_progress: bool | None = None, **params) -> None:
    """A fresh tree over `keys` (entry `ids`, same order) as index/hikvp-<version>.*.npy, entered in the
    manifest `m` (files and m["index"]); visible once `m` is committed."""
    t0 = time.time()
    h = build_hierarchy(keys, progress=bool(show_progress), **params)
    h = h.map_leaves(lambda pos: np.asarray(ids, np.int64)[pos])  # on disk: entry ids, stable across adds
    (root / "index").mkdir(exist_ok=True)
    stem = f"hikvp-{m['version']:06d}"
    files = h.save(root / "index", stem)
    for f in files:
        m["files"][f"index/{f}"] = file_entry(root, f"index/{f}")
    m["index"] = {"stem": stem, "files": files, "built_version": m["version"], "additions": [],
                  "params": params, "stats": h.stats(), "seconds": round(time.time() - t0, 2)}


def place_additions(root: Path, m: dict, new_ids: np.ndarray, keys: np.ndarray) -> None:
    """Entries added live join the inter cluster with the nearest centroid (index/add-<version>.npy);
    the centroids stay as they are until the next write_index."""
    inters = np.load(root / "index" / f"{m['index']['stem']}.inters.npy", allow_pickle=False)
    where = nearest_centroid(keys, inters)
    rel = f"index/add-{m['version']:06d}.npy"
    write_npy(root / rel, np.stack([new_ids, where], 1).astype(np.int64))
    m["files"][rel] = file_entry(root, rel)
    m["index"]["additions"].append({"file": rel, "rows": int(len(new_ids))})


# ---------------------------------------------------------------------------------------------- searching
def gather_children(offsets: torch.Tensor, children: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """All children of `parents` (CSR), concatenated; on whatever device the arrays live."""
    lo, hi = offsets[parents], offsets[parents + 1]
    lens = hi - lo
    total = int(lens.sum())
    if total == 0:
        return children[:0]
    starts = torch.repeat_interleave(lo, lens)
    within = torch.arange(total, device=children.device) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return children[starts + within]
