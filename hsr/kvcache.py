"""hsr.HSRKVCache: a KV cache that decodes by reading only the keys that matter (CPU).

    cache = hsr.HSRKVCache(batch, num_kv_heads, head_dim, dtype=torch.bfloat16,
                           leaf_size=64, policy=hsr.Softmax(eps=1e-3))
    cache.prefill(k, v)                          # (B, Hkv, L, D)
    out, info = cache.decode(q, k_new, v_new)    # q (B, Hq, 1, D); k_new, v_new (B, Hkv, 1, D)

Keys live in two parts: the indexed part (an HSRIndexBatch over the keys, their int8 sketch
and value norms) and a dense tail of fewer than ``leaf_size`` recent keys, always attended in
full; a full tail is appended to the indexed part as one new leaf. The indexed rows are stored
leaf-contiguous (each tree's ids are storage rows, renumbered leaf after leaf whenever the tree
is built), so an opened leaf is one block of K/V and sketch rows. Policies:
- ``hsr.Softmax(eps, select="tree+sketch")``: certified selection (hsr.certified_attention):
  the tree prunes whole nodes, the int8 sketch prunes keys inside the leaves kept (in C++,
  one walk per (batch, kv head) for its GQA group); ``info.mass_bound`` <= eps bounds the
  total-variation distance to dense attention, ``info.error_bound`` the output error (the
  kernel's own float error comes on top). select="sketch" scores every key's sketch,
  select="tree" keeps whole leaves.
- ``hsr.ReLU(alpha, bias, normalize, select)``: every key that can have a positive weight is
  read, found by the tree and the sketch bounds of the leaves it keeps, or from every key's
  sketch bounds (hsr.relu_sketch_attention with or without the index), or by the index's
  half-space query (hsr.relu_reported_attention): the result equals dense ReLU attention up
  to rounding.

The selection and the certificate run in C++; a certified or ReLU tree+sketch step (and a
certified sketch step) is one call from Python: the selection, the kernel over it and the tail,
and the certificate. The other policies attend to their selection and the tail in one
sparse_attention call (hsr's selection_with_tail appends the tail's rows to every pair).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .buffers import KVCache, TokenBuffers
from .certified import (certified_attention, certified_step, relu_sketch_select, selection_eps, threshold_attention,
                        topk_attention, value_norm_bounds)
from .index import HSRIndexBatch, KeyStats, sketch_bytes_per_point
from .ops import attention, sparse_attention
from .sketch import KeySketch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_SOFTMAX_SELECT = ("auto", "tree+sketch", "sketch", "tree")
_RELU_SELECT = ("auto", "tree+sketch", "sketch", "index")


class _BlockMeans(TokenBuffers):
    """Per leaf_size block of indexed keys: the mean of its values (the estimate mode)."""

    _names = ("mean",)

    def __init__(self, batch, heads, value_dim):
        super().__init__(batch, ((heads, value_dim),), torch.float32, "cpu")


class _IndexedBuffers(TokenBuffers):
    """Per indexed key, in storage order: its sketch (codes, lo, delta), the bounds of its
    value's and its own norm, and its arrival position."""

    _names = ("codes", "lo", "delta", "v_norms", "k_norms", "positions")

    def __init__(self, batch, heads, code_bytes, groups):
        super().__init__(batch, ((heads, code_bytes), (heads, groups), (heads, groups), (heads, 1), (heads, 1),
                                 (heads, 1)), torch.float32, "cpu",
                         dtypes=(torch.uint8, torch.float32, torch.float32, torch.float32, torch.float32, torch.int64))


@dataclass(frozen=True)
class Softmax:
    """Certified softmax: the softmax mass left out is at most eps (0 <= eps < 1).
    select: how the keys to read are chosen: "tree+sketch" (the tree prunes whole nodes, the
    key sketch then prunes keys inside the leaves kept), "sketch" (every key's sketch interval,
    in one streaming pass), "tree" (whole leaves, no sketch), or "auto" (the default: the cache
    times tree+sketch and sketch at its probe steps and keeps the faster; both certify the same
    way, the tree only pays when it prunes whole clusters).
    estimate: the uncertified speed mode: the keys left out are added in approximately (their
    sketch scores and the mean value of their leaf_size block of the cache) instead of
    dropped; mass_bound still certifies the selection and error_bound still bounds the output
    error (larger by the estimated share times the value norms); the sketch selection only."""

    eps: float = 1e-3
    select: str = "auto"
    estimate: bool = False
    # The paper's fixed-threshold mode instead of eps: keys with scale * <q, k> >= threshold
    # (a float, in logits) or the paper's rule ("paper", hsr.paper_threshold over the kv
    # head's key statistics); the certificate is still computed and reported, with no promise.
    threshold: float | str | None = None

    def __post_init__(self):
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 <= self.eps < 1.0:
            raise ValueError(f"hsr.Softmax: eps must be in [0, 1), got {self.eps!r}")
        if self.select not in _SOFTMAX_SELECT:
            raise ValueError(f"hsr.Softmax: select must be one of {_SOFTMAX_SELECT}, got {self.select!r}")
        if not isinstance(self.estimate, bool):
            raise ValueError(f"hsr.Softmax: estimate must be True or False, got {self.estimate!r}")
        if self.estimate and (self.select not in ("auto", "sketch") or self.threshold is not None):
            raise ValueError("hsr.Softmax: estimate=True works with the sketch selection (select='auto' or "
                             "'sketch') and no threshold")
        t = self.threshold
        if not (t is None or t == "paper" or (isinstance(t, (int, float)) and not isinstance(t, bool)
                                               and math.isfinite(t))):
            raise ValueError(f"hsr.Softmax: threshold must be None, 'paper' or a finite number, got {t!r}")


@dataclass(frozen=True)
class TopK:
    """Softmax over exactly the k highest-scoring keys of each q head (the index's exact top-k
    search), for comparison with top-k systems; the certificate of the rest is reported."""

    k: int = 256

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"hsr.TopK: k must be a positive integer, got {self.k!r}")


@dataclass(frozen=True)
class ReLU:
    """relu(scale <q, k> - bias) ** alpha attention, exact: only keys with weight 0 are skipped.
    select: how those keys are found: "tree+sketch" (the tree drops whole nodes whose upper
    bound is at most bias, then the keys of the leaves left whose sketch upper bound passes),
    "sketch" (every key's sketch is scanned), "index" (the HSR index's half-space query on a
    float32 copy of the keys: exact scores, more memory), or "auto" (the default: decode times
    tree+sketch and sketch every probe_every steps and keeps the faster)."""

    alpha: int = 2
    bias: float = 0.0
    normalize: bool = True
    select: str = "auto"

    def __post_init__(self):
        if self.select not in _RELU_SELECT:
            raise ValueError(f"hsr.ReLU: select must be one of {_RELU_SELECT}, got {self.select!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int) or self.alpha < 1:
            raise ValueError(f"hsr.ReLU: alpha must be a positive integer, got {self.alpha!r}")
        if not math.isfinite(float(self.bias)):
            raise ValueError(f"hsr.ReLU: bias must be finite, got {self.bias!r}")


@dataclass(frozen=True)
class DecodeInfo:
    """Per (batch, q head): mass_bound and error_bound (float64; 0 for ReLU, which is exact)
    and keys_attended (indexed keys selected + tail); per (batch, kv head): keys_read (keys
    whose K and V were read in full precision: the group's union plus the tail);
    bytes_read: bytes the step read, all heads together (sketch or index scoring, node
    summaries, full-precision K/V, value norms); seconds: wall time of the step; selection:
    the indexed keys read, in hsr.sparse_attention's form (offsets, ids, mask; ids are
    positions), None when nothing is indexed yet or the step read densely; the tail (positions
    from cache.indexed_length on) is always attended as well. path: "sparse" or "dense" (with
    dense_fallback, a step reads every key when that was timed faster: bounds 0, exact);
    select: the selection the step used ("tree+sketch", "sketch" or "tree" for certified
    softmax, "tree+sketch", "sketch" or "index" for ReLU; None for dense steps and the other
    policies). select_seconds: wall time spent choosing the keys to read (tree walk, sketch
    bounds, the cut; TopK and threshold: the index's search and the sketch bounds of the keys
    left out; 0 for a dense step); attend_seconds: in the attention kernel over the selection
    and the tail (one call; a certified step's selection, kernel and certificate are one call,
    whose time after its selection is attend_seconds). The rest of seconds goes to the checks,
    the append, indexing a full tail, a rebuild of the trees when one is due (rebuild_after),
    the certificate of the TopK and threshold policies and, at a probe step, the paths not
    kept. A dense step with nothing else due appends and reads in
    one call, whose time is its attend_seconds."""

    mass_bound: torch.Tensor
    error_bound: torch.Tensor
    keys_attended: torch.Tensor
    keys_read: torch.Tensor
    bytes_read: int
    seconds: float
    selection: tuple | None = None
    path: str = "sparse"
    select: str | None = None
    select_seconds: float = 0.0
    attend_seconds: float = 0.0


# HSRKVCache's default rebuild_after (the transformers integration staggers its layers from it).
REBUILD_AFTER = 0.25


class HSRKVCache:
    """value_dim: the width of the values (head_dim by default); GTA caches value latents
    wider than its keys (hsr.gta.GTAAttention.hsr_cache). rebuild_after: once the keys indexed
    since the trees were last built reach this fraction of the keys they were built over, the
    trees are built again over every indexed key before the next step that walks them (a full
    tail otherwise becomes one new leaf, and leaves of consecutive decode keys prune poorly:
    25% of such leaves made a ReLU step 1.4x slower); a cache whose steps read densely or by
    the sketch alone waits until a probe or its path needs the trees. None never rebuilds
    after the first build; rebuild() builds at once."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device="cpu", leaf_size: int = 64, sketch: str = "int8", policy=None,
                 scale: float | None = None, dense_fallback: bool = True, probe_every: int = 128,
                 value_dim: int | None = None, rebuild_after: float | None = REBUILD_AFTER):
        value_dim = head_dim if value_dim is None else value_dim
        for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("leaf_size", leaf_size), ("value_dim", value_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HSRKVCache: {name} must be a positive integer, got {value!r}")
        if head_dim > 256:
            raise ValueError(f"HSRKVCache: head_dim must be at most 256, got {head_dim}")
        if dtype not in _DTYPES:
            raise ValueError(f"HSRKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        if torch.device(device).type != "cpu":
            raise ValueError(f"HSRKVCache: only device='cpu' is supported so far, got {device!r}")
        if sketch not in ("int8", "int4"):
            raise ValueError(f"HSRKVCache: sketch must be 'int8' or 'int4', got {sketch!r}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"HSRKVCache: probe_every must be a positive integer, got {probe_every!r}")
        if rebuild_after is not None and (isinstance(rebuild_after, bool) or not isinstance(rebuild_after, (int, float))
                                          or not math.isfinite(rebuild_after) or rebuild_after <= 0):
            raise ValueError(f"HSRKVCache: rebuild_after must be a positive number or None, got {rebuild_after!r}")
        policy = Softmax() if policy is None else policy
        if not isinstance(policy, (Softmax, ReLU, TopK)):
            raise ValueError(f"HSRKVCache: policy must be hsr.Softmax(...), hsr.ReLU(...) or hsr.TopK(...), "
                             f"got {policy!r}")
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"HSRKVCache: scale must be positive and finite, got {scale!r}")
        self.batch, self.num_kv_heads, self.head_dim, self.value_dim = batch, num_kv_heads, head_dim, value_dim
        self.dtype, self.leaf_size, self.policy = dtype, leaf_size, policy
        self.sketch_bits = 8 if sketch == "int8" else 4
        self.dense_fallback, self.probe_every = bool(dense_fallback), probe_every
        self.rebuild_after = None if rebuild_after is None else float(rebuild_after)
        # Bytes of one token's keys and values, every (batch, kv head).
        self._kv_bytes_per_token = batch * num_kv_heads * self._token_bytes()
        self.reset()

    def reset(self) -> None:
        """Forget every key."""
        shape = (self.batch, self.num_kv_heads, 0, self.head_dim)
        self._kv = KVCache(self.batch, self.num_kv_heads, self.head_dim, value_dim=self.value_dim,
                           dtype=self.dtype)
        self._indexed = 0
        # Keys the trees were last built over, and how many builds there have been.
        self._built, self._builds = 0, 0
        self._index = self._new_index()
        empty = KeySketch.from_keys(torch.empty(shape), bits=self.sketch_bits)
        self._sketch_group = empty.group
        # Bytes of one key's sketch: codes, then lo and delta per group (float32).
        self._sketch_key_bytes = empty.codes.shape[-1] + 2 * 4 * empty.lo.shape[-1]
        # The indexed keys' sketch, value-norm bounds and arrival positions, growing like the
        # keys (no copy of what is held when a leaf is added).
        self._bufs = _IndexedBuffers(self.batch, self.num_kv_heads, empty.codes.shape[-1], empty.lo.shape[-1])
        # Whether the indexed keys are stored in leaf order (after the first tree build).
        self._reordered = False
        self._v_norm_max = torch.zeros(self.batch, self.num_kv_heads)
        self._block_means = _BlockMeans(self.batch, self.num_kv_heads, self.value_dim)
        # Running sums of the indexed keys and their squares, per (b, kv head): the key
        # statistics of the paper's threshold.
        self._k_sum = torch.zeros(self.batch, self.num_kv_heads, self.head_dim, dtype=torch.float64)
        self._k_sumsq = torch.zeros_like(self._k_sum)
        # The path decode takes ("sparse" or "dense"), the selection the last probe kept for the
        # sparse path, and the steps until the candidates are timed again.
        self._path, self._until_probe = "sparse", 0
        self._kept_select = "tree+sketch"

    @property
    def length(self) -> int:
        return self._kv.length

    @property
    def keys(self) -> torch.Tensor:
        """Every key held, (B, Hkv, length, D), in arrival order: a view until the first tree is
        built, a copy after (the cache stores the indexed keys leaf-contiguous; stored_keys is
        the view)."""
        return self._in_arrival_order(self._kv.keys)

    @property
    def values(self) -> torch.Tensor:
        """Every value held, (B, Hkv, length, value_dim), in arrival order (as keys)."""
        return self._in_arrival_order(self._kv.values)

    @property
    def stored_keys(self) -> torch.Tensor:
        """The keys as stored (a view): the indexed ones leaf after leaf of each (batch, kv
        head)'s tree, so that a leaf is one contiguous block, then the tail in arrival order;
        positions gives each row's arrival position."""
        return self._kv.keys

    @property
    def stored_values(self) -> torch.Tensor:
        """The values as stored (a view), in the order of stored_keys."""
        return self._kv.values

    @property
    def positions(self) -> torch.Tensor:
        """(B, Hkv, length) int64: the arrival position of each stored key."""
        tail = torch.arange(self._indexed, self.length).expand(self.batch, self.num_kv_heads, -1)
        return torch.cat([self._bufs.view("positions")[..., 0], tail], 2)

    def _in_arrival_order(self, stored: torch.Tensor) -> torch.Tensor:
        if not self._reordered:
            return stored
        out = stored.clone()
        pos = self._bufs.view("positions").expand(-1, -1, -1, stored.shape[3])
        out.scatter_(2, pos, stored[:, :, :self._indexed])
        return out

    def _append(self, k: torch.Tensor, v: torch.Tensor, what: str, length: int = -1) -> None:
        """Appends k and v (B, Hkv, L, D) after checking them (shapes, dtype, finite): bad
        input raises ValueError naming HSRKVCache.<what> and leaves the cache unchanged."""
        self._kv.append_tokens(k, v, what=f"HSRKVCache.{what}", length=length, finite=True)

    @property
    def indexed_length(self) -> int:
        return self._indexed

    def _arrival_positions(self, offsets, ids):
        """The arrival positions of a selection's stored rows (ids per (b, kv head) pair)."""
        if not self._reordered or ids.numel() == 0:
            return ids
        return torch.ops.hsr.selection_positions(offsets, ids, self._bufs.view("positions")[..., 0])

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the prompt's keys and values (B, Hkv, L, D) in an empty cache; every whole
        leaf of them is indexed and sketched, the rest forms the tail."""
        if self.length:
            raise ValueError("HSRKVCache.prefill: the cache is not empty (call reset() first, or extend())")
        self._extend(k, v, "prefill")

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append keys and values (B, Hkv, L, D) without attending (a chunk of a chunked
        prefill); the tail's whole leaves are indexed and sketched."""
        self._extend(k, v, "extend")

    def _extend(self, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
        self._append(k, v, what)
        self._index_up_to(self.length - (self.length - self._indexed) % self.leaf_size)
        self._rebuild_if_due()

    @property
    def tree_builds(self) -> int:
        """How many times the trees were built over every indexed key (see rebuild_after)."""
        return self._builds

    def rebuild(self) -> None:
        """Build the trees again over every indexed key, now (each leaf added since the last
        build is one leaf of consecutive keys; a build clusters them)."""
        if self._indexed:
            self._build_trees(self._indexed)

    def _rebuild_if_due(self) -> None:
        """Builds the trees again when rebuild_after says enough keys were indexed since the last
        build and the next step may walk them."""
        added = self._indexed - self._built
        if self.rebuild_after is None or added <= 0 or added < self.rebuild_after * self._built:
            return
        if self._trees_in_use():
            self._build_trees(self._indexed)

    def _trees_in_use(self) -> bool:
        """Whether the next decode step may walk the trees (dense and sketch-only steps read no
        tree)."""
        return any(path == "sparse" and select != "sketch" for path, select in self._step_paths())

    def _step_paths(self) -> list:
        """The (path, select) pairs the next decode step runs: every candidate when a probe is
        due, else the one kept (the only candidate, or the last probe's choice)."""
        candidates = self._candidates()
        if len(candidates) > 1 and self._until_probe == 0:
            return candidates
        return [candidates[0] if len(candidates) == 1 else (self._path, self._kept_select)]

    def _build_trees(self, end: int) -> None:
        """A fresh index over the keys [0, end) (their ids are storage rows), then every one of
        those rows permuted into leaf order; the next step probes its paths again."""
        self._index = self._new_index()
        self._index.add(self._kv.keys[:, :, :end])
        perm = self._index.relabel_in_leaf_order()
        self._kv.permute_tokens(perm)
        self._bufs.permute_tokens(perm)
        self._reordered = True
        self._block_means.reset()
        self._append_block_means(0, end)
        self._built, self._builds = end, self._builds + 1
        self._until_probe = 0

    def _index_up_to(self, end: int) -> None:
        """Index, sketch and take value norms of the keys [indexed, end) (whole leaves). A
        batch larger than what is indexed builds the trees over every indexed key, and every
        indexed row is then permuted into leaf order; smaller ones become new leaves whose rows
        stay where they are (each already one contiguous block), so a tree's ids are always
        storage rows (see also rebuild_after)."""
        start = self._indexed
        if end <= start:
            return
        B, H = self.batch, self.num_kv_heads
        k_new = self._kv.keys[:, :, start:end]
        new = KeySketch.from_keys(k_new, bits=self.sketch_bits)
        new_norms = value_norm_bounds(self._kv.values[:, :, start:end])
        arrival = torch.arange(start, end).view(1, 1, -1, 1).expand(B, H, -1, -1)
        k_norms = value_norm_bounds(k_new).unsqueeze(-1)
        self._bufs.append_tokens(new.codes, new.lo, new.delta, new_norms.unsqueeze(-1), k_norms, arrival)
        # Summed before a build permutes the rows that k_new views.
        k_sum, k_sumsq = torch.ops.hsr.token_moments(k_new)
        self._k_sum += k_sum
        self._k_sumsq += k_sumsq
        self._v_norm_max = torch.maximum(self._v_norm_max, new_norms.amax(-1))
        if end - start > start:
            self._build_trees(end)
        else:
            self._index.add_leaves(k_new)
            self._append_block_means(start, end)
        self._indexed = end

    def _append_block_means(self, start: int, end: int) -> None:
        """The estimate mode's per-leaf value means of the stored rows [start, end) (whole
        leaves)."""
        if not getattr(self.policy, "estimate", False):
            return
        B, H = self.batch, self.num_kv_heads
        v = self._kv.values[:, :, start:end].float()
        L, Dv = v.shape[2], v.shape[3]
        self._block_means.append_tokens(v.view(B, H, L // self.leaf_size, self.leaf_size, Dv).mean(3))

    def _new_index(self) -> HSRIndexBatch:
        """The trees; a float32 copy of the keys only for the policies that query the index
        itself (TopK, ReLU(select="index"), Softmax(threshold=...)): the certified selection
        walks node summaries and reads the cache's own rows."""
        p = self.policy
        points = isinstance(p, TopK) or (isinstance(p, ReLU) and p.select == "index") or \
            (isinstance(p, Softmax) and p.threshold is not None)
        return HSRIndexBatch(batch=self.batch, heads=self.num_kv_heads, d=self.head_dim, leaf_size=self.leaf_size,
                             keep_points=points)

    @property
    def memory_bytes(self) -> dict:
        """Bytes held, by part: "kv" (the keys and values), "sketch" (the key sketch, value
        norms, arrival positions and block means of the indexed keys), "index" (the trees: node
        summaries and ids, plus a float32 copy of the keys for the policies that query the
        index) and "total". Spare capacity of the growing buffers is not counted."""
        parts = dict(kv=self._kv.nbytes, sketch=self._bufs.nbytes + self._block_means.nbytes,
                     index=self._index.nbytes)
        parts["total"] = sum(parts.values())
        return parts

    @property
    def _sketch(self) -> KeySketch:
        """The indexed keys' sketch (views of the growing buffers)."""
        codes, lo, delta = (self._bufs.view(name) for name in ("codes", "lo", "delta"))
        return KeySketch(codes, lo, delta, self.head_dim, self.sketch_bits, self._sketch_group)

    @property
    def _v_norms(self) -> torch.Tensor:
        """(B, Hkv, indexed) float32 upper bounds of the indexed values' norms (a view)."""
        return self._bufs.view("v_norms")[..., 0]

    def _key_stats(self) -> list:
        """KeyStats of the indexed keys per (b, kv head), in (b, h) order."""
        mean = self._k_sum / self._indexed
        std = (self._k_sumsq / self._indexed - mean * mean).clamp(min=0.0).sqrt()
        return [KeyStats(mean[b, h], std[b, h]) for b in range(self.batch) for h in range(self.num_kv_heads)]

    def decode(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append one key and value per kv head, then attend q (B, Hq, 1, D) to every key.
        Returns (out (B, Hq, 1, D) in the cache dtype, DecodeInfo)."""
        start = time.perf_counter()
        if self._dense_step_kept() and isinstance(q, torch.Tensor):
            # Nothing but a dense read is due: the checks (the same as below), the append and
            # the read in one call, in as few Python frames as can be (each costs a cold step
            # microseconds: bench/bench_decode_overhead.py).
            called = time.perf_counter()
            out, mass, err, attended, read = self._kv.append_and_attend(k_new, v_new, q, "HSRKVCache.decode",
                                                                        *self._dense_args())
            self._until_probe -= 1
            end = time.perf_counter()
            return out, DecodeInfo(mass, err, attended, read, self._dense_bytes(), seconds=end - start, path="dense",
                                   attend_seconds=end - called)
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] != self.batch or q.shape[2] != 1 \
                or q.shape[3] != self.head_dim or q.shape[1] % self.num_kv_heads:
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"HSRKVCache.decode: q must be ({self.batch}, Hq, 1, {self.head_dim}) with Hq a "
                             f"multiple of {self.num_kv_heads}, got {got}")
        if q.dtype != self.dtype or q.device.type != "cpu":
            raise ValueError(f"HSRKVCache.decode: q must be a CPU {self.dtype} tensor, got {q.dtype} on {q.device}")
        self._append(k_new, v_new, "decode", length=1)
        if self.length - self._indexed >= self.leaf_size:
            self._index_up_to(self.length)
        self._rebuild_if_due()
        paths = self._step_paths()
        if len(paths) > 1:
            path, select, result = self._probe(q, paths)
        else:
            (path, select), = paths
            result = self._attend(q, select) if path == "sparse" else self._attend_dense(q)
        self._until_probe = self.probe_every - 1 if self._until_probe == 0 else self._until_probe - 1
        out, info, selection = result
        *counts, select_seconds, attend_seconds = info
        return out, DecodeInfo(*counts, seconds=time.perf_counter() - start, selection=selection, path=path,
                               select=None if path == "dense" else select, select_seconds=select_seconds,
                               attend_seconds=attend_seconds)

    def _dense_step_kept(self) -> bool:
        """Whether this step reads densely with nothing else to do: the last probe kept the
        dense path, no probe is due and the new key does not fill the tail (so nothing is
        indexed and no rebuild can be due: the trees are not in use)."""
        return self._path == "dense" and self._until_probe > 0 and self.dense_fallback and \
            self._kv.length + 1 - self._indexed < self.leaf_size

    def _candidates(self):
        """The (path, selection) pairs decode chooses among: the policy's selection ("auto"
        offers tree+sketch and sketch) and, with dense_fallback, reading every key."""
        policy = self.policy
        certified = isinstance(policy, Softmax) and policy.threshold is None
        if certified and policy.estimate:
            sparse = [("sparse", "sketch")]
        elif (certified or isinstance(policy, ReLU)) and policy.select == "auto":
            sparse = [("sparse", "tree+sketch"), ("sparse", "sketch")]
        else:
            sparse = [("sparse", policy.select if certified or isinstance(policy, ReLU) else None)]
        return sparse + ([("dense", None)] if self.dense_fallback else [])

    def _probe(self, q, candidates):
        """Times every candidate path on this step's query and keeps the fastest for the next
        probe_every steps: when the bounds cannot prune, decode reads densely instead of paying
        for a selection that keeps nearly everything, and select="auto" drops the tree walk when
        it does not pay. Each candidate runs twice, in mirrored order (A B C, then C B A), and
        is judged by its total: a single timing let the first candidate pay for caches the
        later ones found warm, and one noisy run decide. Returns the path, selection and result
        kept for this step."""
        seconds, results = dict.fromkeys(candidates, 0.0), {}
        for candidate in candidates + candidates[::-1]:
            path, select = candidate
            t = time.perf_counter()
            results[candidate] = self._attend(q, select) if path == "sparse" else self._attend_dense(q)
            seconds[candidate] += time.perf_counter() - t
        path, select = best = min(candidates, key=seconds.__getitem__)
        self._path = path
        if path == "sparse":
            self._kept_select = select
        return path, select, results[best]

    def _dense_kwargs(self):
        return dict(zip(("kind", "scale", "alpha", "bias", "normalize"), self._dense_args()))

    def _dense_args(self) -> tuple:
        """The attention kernels' score arguments for the policy: (kind, scale, alpha, bias,
        normalize)."""
        p = self.policy
        if isinstance(p, ReLU):
            return "relu", self.scale, p.alpha, float(p.bias), p.normalize
        return "softmax", self.scale, 1, 0.0, True

    def _attend_dense(self, q):
        """Every key, read in full: exact (bounds 0)."""
        B, Hq, Hkv = self.batch, q.shape[1], self.num_kv_heads
        started = time.perf_counter()
        out = attention(q, self._kv.keys, self._kv.values, **self._dense_kwargs())
        attend_seconds = time.perf_counter() - started
        zeros = torch.zeros(B, Hq, dtype=torch.float64)
        info = (zeros, zeros.clone(), torch.full((B, Hq), self.length, dtype=torch.int64),
                torch.full((B, Hkv), self.length, dtype=torch.int64), self._dense_bytes(), 0.0, attend_seconds)
        return out, info, None

    def _dense_bytes(self) -> int:
        """Bytes a dense step reads: every key and value in full precision."""
        return self._kv.length * self._kv_bytes_per_token

    def _token_bytes(self) -> int:
        """Bytes of one key and its value in full precision (one kv head)."""
        return (self.head_dim + self.value_dim) * self.dtype.itemsize

    def _selection_bytes(self, index_stats, select, indexed_read) -> int:
        """Bytes the certified selection read: every key's sketch and value norm without the
        tree; with it (index_stats from the walk), the node summaries it visited (centroid and
        box, float32), the sketch of the keys in the leaves it opened and their value norms
        (select="tree": the indexed keys it read, indexed_read)."""
        every_key = self._indexed * self.batch * self.num_kv_heads
        if not isinstance(self.policy, Softmax) or self.policy.threshold is not None:
            # Every key's sketch (for the certificate) and what the index's query read.
            return every_key * (self._sketch_key_bytes + 4) + self._index_query_bytes()
        if index_stats is None:
            return every_key * (self._sketch_key_bytes + 4)
        opened = int(index_stats[2]) if select != "tree" else indexed_read
        return self._walk_bytes(index_stats) + opened * 4

    def _node_bytes(self, nodes: int) -> int:
        """Bytes of the node summaries a walk read (centroid and box, float32)."""
        return nodes * 3 * self.head_dim * 4

    def _index_query_bytes(self) -> int:
        """Bytes the index's last query read: the node summaries it visited, the sketch of the
        points it bounded and the float32 points it scored."""
        stats = self._index.last_stats
        return (self._node_bytes(stats.nodes_visited) + stats.points_sketched * sketch_bytes_per_point(self.head_dim)
                + stats.points_scored * self.head_dim * 4)

    def _walk_bytes(self, index_stats) -> int:
        """Bytes a two-level walk read, from its (nodes visited, leaves opened, keys sketched,
        boxes read): every visited node's centroid, the boxes it read (float32) and the sketch
        (codes, per-group lo and delta) of the keys scored."""
        nodes, _, sketched, boxes = index_stats.tolist()
        return (nodes + 2 * boxes) * self.head_dim * 4 + sketched * self._sketch_key_bytes

    def _select_and_attend(self, q, select, tail):
        """The softmax-family policies over every key (the indexed ones selected, the last
        `tail` always read): (out, CertifiedInfo)."""
        policy, k, v = self.policy, self._kv.keys, self._kv.values
        if isinstance(policy, TopK):
            return topk_attention(q, k, v, self._index, self._sketch, k_top=policy.k, scale=self.scale,
                                  v_norms=self._v_norms, tail=tail)
        if policy.threshold is not None:
            stats = self._key_stats() if policy.threshold == "paper" else None
            if policy.threshold == "paper" and self._indexed < 2:
                return certified_attention(q, k, v, self._sketch, eps=0.0, scale=self.scale, v_norms=self._v_norms,
                                           tail=tail)
            return threshold_attention(q, k, v, self._index, self._sketch, threshold=policy.threshold,
                                       scale=self.scale, v_norms=self._v_norms, key_stats=stats, tail=tail)
        blocks = dict(value_blocks=self._block_means.view("mean"), block=self.leaf_size) if policy.estimate else {}
        return certified_attention(q, k, v, None if select == "tree" else self._sketch, eps=policy.eps,
                                   scale=self.scale, v_norms=self._v_norms, v_norm_max=self._v_norm_max,
                                   k_norms=self._bufs.view("k_norms")[..., 0],
                                   index=None if select == "sketch" else self._index, tail=tail, **blocks)

    def _attend(self, q, select=None):
        """The policy's selection over the indexed keys and every key of the tail, in one
        attention call."""
        if isinstance(self.policy, ReLU):
            return self._attend_relu(q, select)
        n_idx, tail = self._indexed, self.length - self._indexed
        if not n_idx:  # only the tail: every key, read densely
            return self._attend_dense(q)
        policy = self.policy
        if isinstance(policy, Softmax) and policy.threshold is None and not policy.estimate:
            return self._certified_step(q, select)
        out, info = self._select_and_attend(q, select, tail)
        # The tail adds to what is kept: the bounds stay valid, and the certificate counted it.
        indexed_read = int(info.keys_read.sum())
        bytes_read = (indexed_read + self.batch * self.num_kv_heads * tail) * self._token_bytes()
        bytes_read += self._selection_bytes(info.index_stats, select, indexed_read)
        selection = (info.offsets, self._arrival_positions(info.offsets, info.ids), info.mask)
        return out, (info.mass_bound, info.error_bound, info.keys_selected + tail, info.keys_read + tail,
                     int(bytes_read), info.select_seconds, info.attend_seconds), selection

    def _certified_step(self, q, select):
        """The certified selection ("tree+sketch", "tree" or "sketch"), the kernel over it and
        the tail, and the certificate, in one call (HSRIndexBatch.certified_attend,
        hsr::sketch_certified_attend); the call times its selection, the rest is the kernel's
        and the certificate's."""
        bufs, k, v = self._bufs, self._kv.keys, self._kv.values
        v_norms, k_norms = bufs.view("v_norms")[..., 0], bufs.view("k_norms")[..., 0]
        positions = bufs.view("positions")[..., 0] if self._reordered else None
        codes = (None, None, None) if select == "tree" else tuple(bufs.view(name) for name in ("codes", "lo", "delta"))
        index = None if select == "sketch" else self._index
        eps = selection_eps(self.policy.eps)
        started = time.perf_counter()
        step = certified_step(q, k, v, codes, self.sketch_bits, self._sketch_group, v_norms, k_norms, positions,
                              self._indexed, self.scale, eps, index, self._v_norm_max)
        seconds = time.perf_counter() - started
        out, _, mass, error, offsets, ids, mask, kept, read, _, _, stats, select_seconds = step
        tail_rows = self.batch * self.num_kv_heads * (self.length - self._indexed)
        read_rows = int(read.sum())
        bytes_read = read_rows * self._token_bytes() + self._selection_bytes(
            None if select == "sketch" else stats, select, read_rows - tail_rows)
        info = (mass, error, kept, read, bytes_read, select_seconds, seconds - select_seconds)
        return out, info, (offsets, ids, mask)

    def _attend_relu(self, q, select):
        """ReLU over the indexed keys the selection passes and the tail, in one sparse_attention
        call (one row sum over both, no merge): exact, bounds 0."""
        n_idx, tail = self._indexed, self.length - self._indexed
        if not n_idx:  # only the tail: every key, read densely
            return self._attend_dense(q)
        B, Hq, Hkv = self.batch, q.shape[1], self.num_kv_heads
        zeros = torch.zeros(B, Hq, dtype=torch.float64)
        if select == "tree+sketch":
            return self._relu_step(q, tail, zeros)
        started = time.perf_counter()
        offsets, ids, mask, counts, bytes_read = self._relu_selection(q, select)
        selected = time.perf_counter()
        every = torch.ops.hsr.selection_with_tail(offsets, ids, mask, n_idx, self.length) if tail else \
            (offsets, ids, mask)
        out = sparse_attention(q, self._kv.keys, self._kv.values, *every, **self._dense_kwargs())
        attended = time.perf_counter()
        read = every[0].diff().view(B, Hkv)
        bytes_read += int(every[0][-1]) * self._token_bytes()
        info = (zeros, zeros.clone(), counts + tail, read, int(bytes_read), selected - started, attended - selected)
        return out, info, (offsets, self._arrival_positions(offsets, ids), mask)

    def _relu_step(self, q, tail, zeros):
        """The tree+sketch selection, the tail and the kernel in one call (no selection tensors
        to merge with the tail, no second pass for arrival positions); the call times its
        selection, the rest of its time is the kernel's."""
        policy, sketch = self.policy, self._sketch
        started = time.perf_counter()
        out, offsets, positions, mask, counts, read, stats, select_seconds = self._index._impl.relu_attend(
            q, sketch.codes, sketch.lo, sketch.delta, sketch.bits, sketch.group, self._kv.keys, self._kv.values,
            self._bufs.view("positions")[..., 0] if self._reordered else None, self._indexed, self.scale,
            policy.alpha, float(policy.bias), policy.normalize)
        seconds = time.perf_counter() - started
        bytes_read = self._walk_bytes(stats) + int(read.sum()) * self._token_bytes()
        return out, (zeros, zeros.clone(), counts, read, bytes_read, select_seconds, seconds - select_seconds), \
            (offsets, positions, mask)

    def _relu_selection(self, q, select):
        """The indexed keys that can pass the ReLU threshold, by the index's half-space query
        (select="index") or every key's sketch ("sketch"; tree+sketch is _relu_step): (offsets,
        ids, mask, keys per (batch, q head), bytes the selection read)."""
        qf, bias = q[:, :, 0].float(), float(self.policy.bias)
        if select == "index":  # the index's half-space query on its float32 points
            offsets, ids, mask, counts = self._index.range_union(qf, bias / self.scale)
            return offsets, ids, mask, counts, self._index_query_bytes()
        offsets, ids, mask, counts, _ = relu_sketch_select(qf, self._sketch, self.scale, bias)
        return offsets, ids, mask, counts, self._sketch.nbytes
