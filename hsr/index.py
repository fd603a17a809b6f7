"""The half-space reporting index, with faiss conventions.

    idx = hsr.HSRIndex(d, leaf_size=64)
    idx.add(x)                                  # (n, d); ids next_id .. next_id + n - 1
    lims, D, I = idx.range_search(q, thresh)    # every x with <q, x> >= thresh
    D, I = idx.search(q, k)                     # exact top-k by inner product
    idx.remove_ids(ids); idx.ntotal; idx.d; idx.reset(); idx.last_stats
    hsr.write_index(idx, path); idx2 = hsr.read_index(path)

Results are exact: the tree only skips a node when a bound computed in double, plus a slack
for the float rounding of the scores, proves that no point below it can pass. Scores are the
float32 dot products the index computes (what a float32 scan gives up to summation order).

Unlike faiss's flat index, ids are never renumbered: removing points leaves the other ids as
they are (the index is meant for KV caches, where an id is a position).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["HSRIndex", "HSRIndexBatch", "write_index", "read_index", "paper_threshold", "KeyStats", "IndexStats",
           "sketch_bytes_per_point", "expected_reported_fraction"]


@dataclass(frozen=True)
class IndexStats:
    """What the last query call did, summed over its queries."""

    nodes_visited: int
    points_scored: int  # float scores computed from the points
    points_sketched: int  # score bounds computed from the key sketch (points that then needed
    # no float score are not in points_scored)
    results: int
    queries_scanned: int  # queries that fell back to a plain scan (pruning could not pay)
    queries: int

    @property
    def fell_back_to_scan(self) -> bool:
        return self.queries_scanned > 0

    @classmethod
    def _from(cls, values) -> "IndexStats":
        return cls(*[int(v) for v in values])


def sketch_bytes_per_point(d: int) -> int:
    """Bytes of the index's key sketch per point of dimension d: int8 codes plus, per group of
    32 channels, a float offset and step (what a query reads for every point it sketches)."""
    return d + 8 * ((d + 31) // 32)


def _as_float32_tensor(x, name: str, what: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy): float32 CPU tensor view/copy of a tensor or array-like."""
    was_numpy = isinstance(x, np.ndarray)
    if was_numpy:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{what}: {name} must hold floating-point values, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: {name} must hold floating-point values, got dtype {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"{what}: {name} must be on the CPU (the index is a CPU structure), got {x.device}")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return (x if x.is_contiguous() else x.contiguous()), was_numpy


def _batch_keys(keys, what: str) -> torch.Tensor:
    """Keys for HSRIndexBatch: CPU float32, float16 and bfloat16 tensors as they are (the C++
    side copies only a tensor whose trees' keys are not each one block), anything else as
    _as_float32_tensor makes it."""
    if isinstance(keys, torch.Tensor) and keys.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and keys.device.type == "cpu":
        return keys
    return _as_float32_tensor(keys, "keys", what)[0]


def _out(t: torch.Tensor, as_numpy: bool):
    return t.numpy() if as_numpy else t


class _QueryRouting:
    """What HSRIndex and HSRIndexBatch share over their C++ object: the last call's
    statistics and the scan-or-traverse setting."""

    @property
    def last_stats(self) -> IndexStats:
        return IndexStats._from(self._impl.last_stats())

    @property
    def scan_fraction(self) -> float:
        """When a query is answered by an exact scan instead of the tree (same results, same
        scores): a range query when its walk's frontier count (which over-states what the walk
        opens) passes this fraction of the points; a top-k search when the leaves it opened hold
        a thirty-second of this fraction without finishing, or at once below 32768 points; an
        HSRIndexBatch's ReLU selection (hsr.relu_sketch_attention(index=), a cache's ReLU
        tree+sketch step) scans every key's sketch of a tree when the nodes its walk keeps open
        hold more than this fraction of the keys. 0 scans every query, 1 never scans; default
        0.5. A runtime setting: not saved by write_index."""
        return self._impl.scan_fraction()

    @scan_fraction.setter
    def scan_fraction(self, value: float) -> None:
        self._impl.set_scan_fraction(_scan_fraction(value, f"{type(self).__name__}.scan_fraction"))


class HSRIndex(_QueryRouting):
    """Exact half-space reporting / maximum-inner-product index over points in R^d (1 <= d <= 256)."""

    def __init__(self, d: int, leaf_size: int = 64):
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 256:
            raise ValueError(f"HSRIndex: d must be an integer in [1, 256], got {d!r}")
        if isinstance(leaf_size, bool) or not isinstance(leaf_size, int) or not 1 <= leaf_size <= 65536:
            raise ValueError(f"HSRIndex: leaf_size must be an integer in [1, 65536], got {leaf_size!r}")
        self._impl = torch.classes.hsr.Index(d, leaf_size)
        self._d = d  # read on every call: cheaper than asking the C++ side

    @property
    def d(self) -> int:
        return self._d

    @property
    def ntotal(self) -> int:
        """Number of points stored (after removals)."""
        return self._impl.ntotal()

    @property
    def next_id(self) -> int:
        """The id the next added point receives."""
        return self._impl.next_id()

    @property
    def leaf_size(self) -> int:
        return self._impl.leaf_size()

    @property
    def depth(self) -> int:
        return self._impl.depth()

    def _points(self, x, name, what):
        # NaN/Inf are rejected by the C++ side, in one pass before anything changes.
        t, was_numpy = _as_float32_tensor(x, name, what)
        d = self._d
        if t.dim() == 1 and t.shape[0] == d:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[1] != d:
            raise ValueError(f"{what}: {name} must have shape (n, {d}), got {tuple(t.shape)}")
        return t, was_numpy

    def add(self, x) -> None:
        """Add points (n, d); they get ids next_id .. next_id + n - 1."""
        t, _ = self._points(x, "x", "HSRIndex.add")
        self._impl.add(t)

    def range_search(self, q, thresh):
        """Every stored x with <q, x> >= thresh, per query.

        q: (m, d); thresh: a float or one per query (m,). Returns (lims, D, I) as faiss does:
        the results of query i are D[lims[i]:lims[i+1]] (scores) and I[...] (ids), sorted by
        id. numpy in, numpy out; tensors otherwise.
        """
        t, was_numpy = self._points(q, "q", "HSRIndex.range_search")
        th = _thresholds(thresh, t.shape[0], "HSRIndex.range_search")
        lims, scores, ids = self._impl.range_search(t, th)
        return _out(lims, was_numpy), _out(scores, was_numpy), _out(ids, was_numpy)

    def search(self, q, k: int):
        """The k stored points of largest <q, x>, per query: (D, I), each (m, k), sorted by
        descending score (ties by ascending id); padded with -inf / -1 past ntotal."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"HSRIndex.search: k must be a non-negative integer, got {k!r}")
        t, was_numpy = self._points(q, "q", "HSRIndex.search")
        scores, ids = self._impl.search(t, int(k))
        return _out(scores, was_numpy), _out(ids, was_numpy)

    def remove_ids(self, ids) -> int:
        """Remove the points with these ids; returns how many were removed (unknown ids are
        ignored). Other ids do not change."""
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(np.ascontiguousarray(ids))
        elif not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(list(ids) if not isinstance(ids, int) else [ids], dtype=torch.int64)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"HSRIndex.remove_ids: ids must be integers, got dtype {ids.dtype}")
        return self._impl.remove_ids(ids.reshape(-1).to(torch.int64).cpu())

    def reset(self) -> None:
        """Remove every point and restart ids at 0."""
        self._impl.reset()

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"HSRIndex(d={self.d}, leaf_size={self.leaf_size}, ntotal={self.ntotal})"


class HSRIndexBatch(_QueryRouting):
    """One index per (batch, kv head) of a KV cache, built and queried in parallel.

    keys: (B, H, n, d). Queries (B, Hq, d) with Hq a multiple of H: query head h uses the tree
    of kv head h // (Hq // H) (GQA). Ids are positions within each (b, h) key sequence.
    keep_points=False keeps only the node summaries and ids, not a float32 copy of the keys
    (for a caller that holds the keys itself and only walks the nodes, as hsr.HSRKVCache's
    certified selection does): it is built by one add() on empty trees and then grows by
    add_leaves(); range_search and search raise.
    """

    def __init__(self, keys: torch.Tensor | None = None, *, batch: int | None = None,
                 heads: int | None = None, d: int | None = None, leaf_size: int = 64, keep_points: bool = True):
        if keys is not None:
            if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
                raise ValueError("HSRIndexBatch: keys must be a 4-D tensor (B, H, n, d)")
            batch, heads, d = keys.shape[0], keys.shape[1], keys.shape[3]
        if batch is None or heads is None or d is None:
            raise ValueError("HSRIndexBatch: pass keys (B, H, n, d) or batch=, heads= and d=")
        if not 1 <= d <= 256:
            raise ValueError(f"HSRIndexBatch: d must be in [1, 256], got {d}")
        self.batch, self.heads, self.d = int(batch), int(heads), int(d)
        if not isinstance(keep_points, bool):
            raise ValueError(f"HSRIndexBatch: keep_points must be True or False, got {keep_points!r}")
        self._impl = torch.classes.hsr.IndexBatch(self.batch, self.heads, self.d, int(leaf_size), keep_points)
        if keys is not None:
            self.add(keys)

    def add(self, keys: torch.Tensor) -> None:
        """Append keys (B, H, n, d) to every tree (ids continue per tree). float16 and bfloat16
        keys are taken as they are (each tree converts its own keys while it builds)."""
        t = _batch_keys(keys, "HSRIndexBatch.add")
        if t.dim() != 4 or tuple(t.shape[:2]) != (self.batch, self.heads) or t.shape[3] != self.d:
            raise ValueError(f"HSRIndexBatch.add: keys must be ({self.batch}, {self.heads}, n, {self.d}), "
                             f"got {tuple(t.shape)}")
        self._impl.add(t)

    def add_leaves(self, keys: torch.Tensor) -> None:
        """Append keys (B, H, n, d) to every tree as new leaves of leaf_size keys (the last one
        may be shorter), each holding consecutive ids; no existing leaf changes (a KV cache
        stored leaf-contiguous appends each new leaf's rows as one block). Dtypes as in add."""
        self._impl.add_leaves(_batch_keys(keys, "HSRIndexBatch.add_leaves"))

    def relabel_in_leaf_order(self) -> torch.Tensor:
        """Renumber every tree's keys 0..n-1 leaf after leaf (the trees must hold the same n),
        so that each leaf holds consecutive ids. Returns (B, H, n) int64: the old id of each
        new id (a KV cache permutes its rows with it to store them leaf-contiguous)."""
        return self._impl.relabel_in_leaf_order()

    def _queries(self, q, what):
        t, _ = _as_float32_tensor(q, "q", what)
        if t.dim() != 3 or t.shape[0] != self.batch or t.shape[2] != self.d:
            raise ValueError(f"{what}: q must be ({self.batch}, Hq, {self.d}), got {tuple(t.shape)}")
        if t.shape[1] % self.heads:
            raise ValueError(f"{what}: the number of q heads ({t.shape[1]}) must be a multiple of "
                             f"the number of kv heads ({self.heads})")
        return t

    def range_search(self, q, thresh):
        """(lims, D, I) over the B*Hq queries in (b, hq) order; thresh a float or (B, Hq)."""
        t = self._queries(q, "HSRIndexBatch.range_search")
        th = _thresholds(thresh, t.shape[0] * t.shape[1], "HSRIndexBatch.range_search")
        return self._impl.range_search(t, th)

    def range_union(self, q, thresh):
        """range_search grouped the way hsr.sparse_attention reads a selection: per (batch, kv
        head) the union of its q heads' hits in id order. Returns (offsets (B*H + 1,), ids,
        mask (len(ids), Hq/H) bool: which q heads each id passed, counts (B, Hq): hits per q
        head)."""
        t = self._queries(q, "HSRIndexBatch.range_union")
        th = _thresholds(thresh, t.shape[0] * t.shape[1], "HSRIndexBatch.range_union")
        return self._impl.range_union(t, th)

    def search(self, q, k: int):
        """Top-k per query: (D, I), each (B, Hq, k)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"HSRIndexBatch.search: k must be a non-negative integer, got {k!r}")
        return self._impl.search(self._queries(q, "HSRIndexBatch.search"), k)

    @property
    def ntotal(self) -> torch.Tensor:
        """(B, H) number of keys per tree."""
        return self._impl.ntotal()

    @property
    def keeps_points(self) -> bool:
        return self._impl.keeps_points()

    @property
    def nbytes(self) -> int:
        """Bytes the trees hold (nodes, ids, and the points when kept)."""
        return self._impl.memory_bytes()


def _scan_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _thresholds(thresh, m: int, what: str) -> torch.Tensor:
    if isinstance(thresh, (int, float, np.floating, np.integer)) and not isinstance(thresh, bool):
        if math.isnan(float(thresh)):
            raise ValueError(f"{what}: thresh is NaN")
        return torch.tensor([float(thresh)], dtype=torch.float32)
    t = torch.as_tensor(thresh, dtype=torch.float32).reshape(-1).cpu()
    if t.numel() not in (1, m):
        raise ValueError(f"{what}: thresh must be a float or hold one value per query ({m}), got {t.numel()}")
    if torch.isnan(t).any():
        raise ValueError(f"{what}: thresh contains NaN")
    return t


def write_index(index: HSRIndex, path: str | os.PathLike) -> None:
    """Write an index to a file (versioned and checksummed)."""
    if not isinstance(index, HSRIndex):
        raise TypeError(f"write_index: expected an HSRIndex, got {type(index).__name__}")
    payload = index._impl.to_bytes().numpy().tobytes()
    with open(path, "wb") as f:
        f.write(payload)


def read_index(path: str | os.PathLike) -> HSRIndex:
    """Read an index written by write_index. A truncated or corrupted file raises ValueError."""
    with open(path, "rb") as f:
        data = f.read()
    index = HSRIndex.__new__(HSRIndex)
    impl = torch.classes.hsr.Index(1, 1)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    impl.load_bytes(buf)
    index._impl = impl
    index._d = impl.d()
    return index


@dataclass(frozen=True)
class KeyStats:
    """Per-coordinate mean and standard deviation of a key set (float64, shape (d,))."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> "KeyStats":
        k = torch.as_tensor(keys).reshape(-1, torch.as_tensor(keys).shape[-1]).to(torch.float64)
        if k.shape[0] == 0:
            raise ValueError("KeyStats.from_keys: no keys")
        return cls(mean=k.mean(0), std=k.std(0, correction=0))


def paper_threshold(q, keys_stats, n: int) -> torch.Tensor:
    """The HSR paper's reporting threshold b = <q, mu> + sigma_q * sqrt(0.4 ln n).

    Assumptions (arXiv 2410.10165, decoding analysis): the keys' coordinates are independent
    with means mu_t and standard deviations s_t, so that the score <q, k> of a random key is
    approximately Gaussian with mean <q, mu> and standard deviation
    sigma_q = sqrt(sum_t q_t^2 s_t^2). Then P(<q, k> >= b) <= exp(-(b - <q, mu>)^2 / (2 sigma_q^2))
    = n^(-1/5), so at most about n^(4/5) of n keys are reported in expectation. (The exact
    Gaussian tail, n * Q(sqrt(0.4 ln n)), is smaller by a factor of about
    1 / (sqrt(2 pi) * sqrt(0.4 ln n)); see expected_reported_fraction.) The paper states the rule
    for centred keys (mu = 0): b = sigma * sqrt(0.4 log n).

    q: (..., d); keys_stats: a KeyStats, a float (the same s for every coordinate, mu = 0) or a
    (d,) tensor of per-coordinate standard deviations (mu = 0). Returns b with q's leading shape.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"paper_threshold: n must be an integer >= 2, got {n!r}")
    q = torch.as_tensor(q).to(torch.float64)
    d = q.shape[-1]
    if isinstance(keys_stats, KeyStats):
        mean, std = keys_stats.mean.to(torch.float64), keys_stats.std.to(torch.float64)
    elif isinstance(keys_stats, (int, float)):
        if not keys_stats >= 0:
            raise ValueError(f"paper_threshold: the key standard deviation must be >= 0, got {keys_stats}")
        mean, std = torch.zeros(d, dtype=torch.float64), torch.full((d,), float(keys_stats), dtype=torch.float64)
    else:
        std = torch.as_tensor(keys_stats, dtype=torch.float64)
        mean = torch.zeros_like(std)
    if mean.shape != (d,) or std.shape != (d,):
        raise ValueError(f"paper_threshold: key statistics must have shape ({d},), got {tuple(std.shape)}")
    sigma_q = torch.sqrt((q * q * std * std).sum(-1))
    return (q * mean).sum(-1) + sigma_q * math.sqrt(0.4 * math.log(n))


def expected_reported_fraction(n: int) -> float:
    """Exact Gaussian fraction of keys above the paper threshold: Q(sqrt(0.4 ln n))."""
    z = math.sqrt(0.4 * math.log(n))
    return 0.5 * math.erfc(z / math.sqrt(2.0))
