"""Certified sparse softmax decoding over a sketched key set (DESIGN 4 and 4a).

    sketch = hsr.KeySketch.from_keys(k)                    # k (B, Hkv, n, D)
    out, info = hsr.certified_attention(q, k, v, sketch, eps=1e-3)

For every (batch, q head), keys are selected from their sketch score intervals so that the
softmax mass left out is certified to be at most ``eps``; only the selected keys are read
in full precision (one walk per kv head serves its GQA group: the union of the heads'
selections, with per-head masks). ``info.mass_bound`` is the certificate tau_bar computed
after attention from the exact normaliser of the selected keys: the total-variation
distance between the true attention distribution and the one over the selected keys, and
``info.error_bound`` bounds |o - o_S|_2 (o: attention over all keys, o_S: over the selected
keys, both in exact arithmetic; the kernel's own float error, as in dense attention, comes on
top). This is the per-key level of the two-level selection; the tree level is not used here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from .ops import sparse_attention
from .sketch import KeySketch

# The overload itself: through the overload packet, a cold decode step spends microseconds more
# in Python.
_SKETCH_CERTIFIED_ATTEND = torch.ops.hsr.sketch_certified_attend.default


def value_norm_bounds(v: torch.Tensor) -> torch.Tensor:
    """(..., n) float32 upper bounds of |v_i|_2 for values (..., n, D) on the CPU: each norm
    summed in float64 from the stored elements (no float copy of v), widened by its rounding
    bound and rounded up to float (torch.ops.hsr.row_norm_bounds)."""
    if not isinstance(v, torch.Tensor) or v.device.type != "cpu":
        got = v.device if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"hsr.value_norm_bounds: v must be a CPU tensor, got {got}")
    return torch.ops.hsr.row_norm_bounds(v)


def _decode_problem(what, q, k, v, scale, tail=0):
    """Validates decode queries q (B, Hq, 1, D) against k (B, Hkv, n + tail, D) and v (B, Hkv,
    n + tail, Dv); returns (B, Hq, Hkv, n, D, G, scale) with the scale resolved (1/sqrt(D) by
    default): n counts the keys before the tail (those the selection chooses among)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{what}: q must be (B, Hq, 1, D) decode queries, got {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3]:
        raise ValueError(f"{what}: k and v must be (B, Hkv, n, D) and (B, Hkv, n, Dv) matching q, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{what}: Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{what}: scale must be positive and finite, got {scale!r}")
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail < max(n, 1):
        raise ValueError(f"{what}: tail must be an integer in [0, {n}) (k holds {n} keys), got {tail!r}")
    return B, Hq, Hkv, n - tail, D, Hq // Hkv, scale


def _check_sketch(what, sketch, B, Hkv, n, D):
    if not isinstance(sketch, KeySketch) or tuple(sketch.codes.shape[:3]) != (B, Hkv, n) or sketch.dim != D:
        raise ValueError(f"{what}: sketch must be KeySketch.from_keys(k)")


def _check_bias(what, bias):
    if not math.isfinite(float(bias)):
        raise ValueError(f"{what}: bias must be finite, got {bias!r}")


def _sketch_intervals(qf, sketch, b, h, G):
    """(estimate, radius), each (G, n): the sketch intervals of kv head (b, h) for its G q heads."""
    return torch.ops.hsr.sketch_score_intervals(qf[b, h * G:(h + 1) * G], sketch.codes[b, h], sketch.lo[b, h],
                                                sketch.delta[b, h], sketch.bits, sketch.group)


def _scaled_upper(est, rad, scale):
    """Upper bounds of the scaled scores in float64 from sketch intervals, widened by a hair
    for the float64 arithmetic itself."""
    upper = (est.double() + rad.double()) * scale
    return upper + upper.abs() * 1e-12 + 1e-300


class _Selection:
    """The keys each (batch, kv head) reads, in hsr.sparse_attention's form, built pair by
    pair in (b, h) order from the (G, n) choices of the group's q heads."""

    def __init__(self):
        self.offsets, self.ids, self.masks = [0], [], []

    def add(self, chosen: torch.Tensor) -> None:
        union = torch.nonzero(chosen.any(0)).flatten()
        self.ids.append(union)
        self.masks.append(chosen[:, union].T)
        self.offsets.append(self.offsets[-1] + union.numel())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.offsets, dtype=torch.int64), torch.cat(self.ids),
                torch.cat(self.masks).contiguous())


@dataclass(frozen=True)
class CertifiedInfo:
    """Per (batch, q head) unless said: mass_bound (tau_bar) and error_bound, float64;
    keys_selected (int64); per (batch, kv head): keys_read (the union over the group); and
    the selection itself in hsr.sparse_attention's form (offsets, ids, mask)."""

    mass_bound: torch.Tensor
    error_bound: torch.Tensor
    keys_selected: torch.Tensor
    keys_read: torch.Tensor
    offsets: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    # Per (batch, q head): the largest value norm (rounded up) among the keys left out and
    # among those kept (0 where none), the ingredients of error_bound.
    v_left_max: torch.Tensor
    v_kept_max: torch.Tensor
    # (B, Hq) float32: log of the kept keys' (and the tail's) softmax normaliser, to merge with
    # other keys.
    lse: torch.Tensor
    # With an index: int64 [nodes_visited, leaves_opened, keys_sketched, boxes_read] summed
    # over the trees (boxes_read: nodes whose box was read besides their centroid); None
    # without.
    index_stats: torch.Tensor | None = None
    # With value_blocks (the estimate mode), per (batch, q head): the estimated share of the
    # softmax mass added in for the keys left out (lambda_hat) and the largest norm of a block
    # value mean (rounded up); error_bound includes lambda_hat * (that norm + v_kept_max).
    estimate_share: torch.Tensor | None = None
    estimate_norm: torch.Tensor | None = None
    # Wall seconds spent choosing the keys (tree walk, sketch bounds, the cut; for a fixed set
    # also the sketch bounds of the keys left out) and in the attention kernel over them (with
    # the certificate where one call computes both: the certified selections without
    # value_blocks).
    select_seconds: float = 0.0
    attend_seconds: float = 0.0


def certified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sketch: KeySketch | None, *,
                        eps: float, scale: float | None = None, v_norms: torch.Tensor | None = None,
                        v_norm_max: torch.Tensor | None = None, index=None,
                        value_blocks: torch.Tensor | None = None, block: int | None = None,
                        k_norms: torch.Tensor | None = None, tail: int = 0) -> tuple[torch.Tensor, CertifiedInfo]:
    """Softmax attention of decode queries q (B, Hq, 1, D) over k, v (B, Hkv, n, D) (CPU),
    reading in full only the keys the bounds cannot certify away; see the module docstring.

    sketch: KeySketch.from_keys(k), or None with an index (tree-only selection). index:
    hsr.HSRIndexBatch over k (ids = positions): the two-level selection (the tree prunes whole
    nodes first, the sketch then prunes keys inside the leaves kept); info.index_stats holds
    its [nodes_visited, leaves_opened, keys_sketched, boxes_read]. Without an index every key's sketch
    interval is computed. v_norms (B, Hkv, n): value_norm_bounds(v), computed from v when not
    given (a cache keeps them); v_norm_max (B, Hkv): their maximum (taken from v_norms when not
    given). eps in [0, 1): 0 selects everything (exact).

    k_norms (B, Hkv, n) float32: upper bounds of the keys' norms (value_norm_bounds(k); a cache
    keeps them), for the certificate's score-rounding term; taken from the kept keys when not
    given.

    value_blocks (B, Hkv, ceil(n / block), Dv) float32, the mean value of each block of `block`
    consecutive keys (sketch selection only): the estimate mode (hsr.Softmax(estimate=True)).
    The keys left out are not dropped but added in approximately: each with the softmax weight
    of its sketch score (the centre of its interval) and its block's mean value. Not certified
    as an approximation; info.mass_bound still certifies the selection, and info.error_bound
    still bounds |o - out| (exact arithmetic): mass_bound * (v_left + v_kept) + lambda_hat *
    (max block-mean norm + v_kept), lambda_hat the estimated share added in.

    tail: the last `tail` keys of k and v (a cache's recent keys, in no sketch or index) are
    always attended, in the same kernel call; the sketch, index, v_norms and k_norms cover the
    n keys before them, and info's selection and counts describe those n (the tail counts as
    kept in the certificate, and in v_kept_max).
    """
    what = "hsr.certified_attention"
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"{what}: eps must be in [0, 1), got {eps!r}")
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale, tail)
    if n == 0:
        raise ValueError(f"{what}: k and v must hold at least one key")
    if sketch is not None or index is None:
        _check_sketch(what, sketch, B, Hkv, n, D)
    v_up_f = value_norm_bounds(v[:, :, :n]) if v_norms is None else v_norms
    if k_norms is not None and (not isinstance(k_norms, torch.Tensor) or k_norms.dtype != torch.float32
                                or tuple(k_norms.shape) != (B, Hkv, n)):
        raise ValueError(f"{what}: k_norms must be float32 ({B}, {Hkv}, {n}) (value_norm_bounds(k))")
    started = time.perf_counter()
    eps_select = selection_eps(eps)
    if value_blocks is not None:
        if index is not None or sketch is None:
            raise ValueError(f"{what}: value_blocks (the estimate mode) needs the sketch selection (no index)")
        _check_value_blocks(what, value_blocks, block, B, Hkv, n, v.shape[3])
        qf = q[:, :, 0].float()
        offsets_t, ids_t, mask_t, log_left, v_left, v_kept, selected, weights, log_ref = \
            torch.ops.hsr.sketch_select_estimate(qf, sketch.codes, sketch.lo, sketch.delta, sketch.bits, sketch.group,
                                                 v_up_f, scale, eps_select, block)
        out, info = _attend_and_certify(q, qf, k, v, scale, (offsets_t, ids_t, mask_t), log_left, v_left, v_kept,
                                        selected, None, k_norms, time.perf_counter() - started, tail)
        return _add_estimate(out, info, weights, log_ref, value_blocks)
    v_max = None
    if index is not None:
        _check_index(what, index, B, Hkv, n, D)
        v_max = (v_up_f.amax(-1) if v_norm_max is None else v_norm_max).contiguous()
    codes = (None, None, None) if sketch is None else (sketch.codes, sketch.lo, sketch.delta)
    bits, group = (8, 32) if sketch is None else (sketch.bits, sketch.group)
    step = certified_step(q, k, v, codes, bits, group, v_up_f, k_norms, None, n, scale, eps_select, index, v_max)
    seconds = time.perf_counter() - started
    out, lse, mass, error, offsets_t, ids_t, mask_t, kept, read, v_left, v_kept, stats, select_seconds = step
    if tail:  # info describes the n keys before the tail
        kept, read = kept - tail, read - tail
    return out, CertifiedInfo(mass, error, kept, read, offsets_t, ids_t, mask_t, v_left, v_kept, lse,
                              None if index is None else stats, select_seconds=select_seconds,
                              attend_seconds=seconds - select_seconds)


def certified_step(q, k, v, codes, bits, group, v_norms, k_norms, positions, n, scale, eps, index=None,
                   v_norm_max=None):
    """A certified decode step in one C++ call, unchecked (the caller owns consistent
    arguments): the selection over the first n keys of k, v (every key's sketch when index is
    None, hsr::sketch_certified_attend; else the index's walk, then the sketch of the leaves
    it opens, or whole leaves when codes are (None, None, None)), the kernel over it and the
    tail [n, Lk), and the certificate. codes: (codes, lo, delta) of the sketch; positions: the
    stored rows' arrival positions or None; eps: selection_eps of the policy's. Returns (out,
    lse, mass_bound, error_bound, offsets, ids, mask, keys kept, keys read, v_left_max,
    v_kept_max, stats, select_seconds), the tail counted in keys kept and read."""
    if index is None:
        return _SKETCH_CERTIFIED_ATTEND(q, *codes, bits, group, v_norms, k_norms, k, v, positions, scale, eps)
    return index._impl.certified_attend(q, *codes, bits, group, v_norms, v_norm_max, k_norms, k, v, positions, n,
                                        scale, eps)


def selection_eps(eps: float) -> float:
    """The eps a certified selection aims at, a hair stricter than the policy's: the certificate
    computed afterwards uses the kernel's normaliser, deflated for its float rounding."""
    return eps * (1.0 - 1e-3)


def _check_value_blocks(what, value_blocks, block, B, Hkv, n, Dv):
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{what}: block must be a positive integer with value_blocks, got {block!r}")
    want = (B, Hkv, -(-n // block), Dv)
    if not isinstance(value_blocks, torch.Tensor) or value_blocks.dtype != torch.float32 \
            or tuple(value_blocks.shape) != want:
        raise ValueError(f"{what}: value_blocks must be float32 {want} (the mean value of each block of {block} "
                         f"keys)")


def _add_estimate(out, info, weights, log_ref, value_blocks):
    """Merges the selected keys' attention (out, info.lse) with the estimate of the keys left
    out (per-block weights relative to e^{log_ref}, block means value_blocks), in float64;
    returns (out, info) with the merged lse and the widened error bound."""
    B, Hq, _, Dv = out.shape
    Hkv = value_blocks.shape[1]
    G = Hq // Hkv
    total = weights.sum(-1)                                                          # (B, Hq)
    nb = value_blocks.shape[2]
    o_left = torch.einsum("bhgn,bhnd->bhgd", weights.view(B, Hkv, G, nb), value_blocks.double()).reshape(B, Hq, Dv)
    o_left = o_left / total.clamp(min=1e-300).unsqueeze(-1)
    lse_s = info.lse.double()
    lse_t = torch.where(total > 0, log_ref + total.clamp(min=1e-300).log(), torch.full_like(total, float("-inf")))
    m = torch.maximum(lse_s, lse_t)
    w_s, w_t = torch.exp(lse_s - m), torch.exp(lse_t - m)
    share = w_t / (w_s + w_t)                                                        # lambda_hat
    merged = (1 - share).unsqueeze(-1) * out[:, :, 0].double() + share.unsqueeze(-1) * o_left
    block_norm = (value_blocks.double().norm(dim=-1).amax(-1) * (1 + 1e-6)).repeat_interleave(G, 1)  # (B, Hq)
    error = info.error_bound + share * (block_norm + info.v_kept_max)
    lse = (m + torch.log(w_s + w_t)).float()
    return merged.to(out.dtype).unsqueeze(2), replace(info, error_bound=error, lse=lse, estimate_share=share,
                                                     estimate_norm=block_norm)


def _attend_and_certify(q, qf, k, v, scale, selection, log_left, v_left, v_kept, selected, index_stats, k_norms,
                        select_seconds, tail):
    """Softmax over the selected keys and the last `tail` keys of k, v, and its certificate,
    from the per (batch, q head) log of the left-out upper-bound mass and the largest value
    norms left out and kept. qf: q[:, :, 0] in float32, as the selection used it."""
    offsets_t, ids_t, mask_t = selection
    n = k.shape[2] - tail
    started = time.perf_counter()
    every = torch.ops.hsr.selection_with_tail(offsets_t, ids_t, mask_t, n, n + tail) if tail else selection
    out, lse = sparse_attention(q, k, v, *every, scale=scale, return_lse=True)
    attend_seconds = time.perf_counter() - started
    # T / (Z + T) from the kernel's normaliser, deflated for its float rounding (scores and
    # sums; see csrc/include/hsr/sketch/certificate.h), and the output error it allows:
    # o - o_S = tau_true (o_T - o_S), o_T and o_S convex combinations of the left-out and the
    # kept values (the tail's among them).
    mass, error, v_kept = torch.ops.hsr.softmax_certificate(qf, lse[:, :, 0], *every, k, k_norms, v, n, log_left,
                                                            v_left, v_kept, selected + tail, scale)
    keys_read = offsets_t.diff().view(k.shape[0], k.shape[1])
    return out, CertifiedInfo(mass, error, selected, keys_read, offsets_t, ids_t, mask_t, v_left, v_kept,
                              lse[:, :, 0], index_stats, select_seconds=select_seconds,
                              attend_seconds=attend_seconds)


def _left_out_by_sketch(qf, sketch, v_up_f, scale, chosen, b, h, G):
    """For a fixed choice (G, n) of kv head (b, h): per q head the log of the sketch
    upper-bound mass of the keys not chosen (rounded up; -inf when all are chosen) and the
    largest value norm left out and kept (0 when none)."""
    upper = _scaled_upper(*_sketch_intervals(qf, sketch, b, h, G), scale)
    left = torch.logsumexp(upper.masked_fill(chosen, float("-inf")), 1)
    # The double sum's rounding (left is -inf when every key is chosen).
    left = torch.where(torch.isinf(left), left, left + left.abs() * 1e-12 + (chosen.shape[1] + 4) * 2.3e-16)
    vn = v_up_f[b, h].double().unsqueeze(0).expand_as(upper)
    v_left = vn.masked_fill(chosen, 0.0).amax(1)
    v_kept = vn.masked_fill(~chosen, 0.0).amax(1)
    return left, v_left, v_kept


def fixed_set_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sketch: KeySketch,
                        chosen: torch.Tensor, *, scale: float | None = None,
                        v_norms: torch.Tensor | None = None, tail: int = 0) -> tuple[torch.Tensor, CertifiedInfo]:
    """Softmax attention of decode queries q (B, Hq, 1, D) over the keys chosen (B, Hq, n)
    bool, with the certificate of what the choice leaves out, from the sketch's upper bounds
    of the other keys (no promise on its size: the choice is the caller's, e.g. a fixed
    threshold or the top k). Same info, and tail, as certified_attention."""
    what = "hsr.fixed_set_attention"
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale, tail)
    if n == 0:
        raise ValueError(f"{what}: k and v must hold at least one key")
    _check_sketch(what, sketch, B, Hkv, n, D)
    if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool or tuple(chosen.shape) != (B, Hq, n):
        raise ValueError(f"{what}: chosen must be a bool tensor ({B}, {Hq}, {n})")
    started = time.perf_counter()
    v_up_f = value_norm_bounds(v[:, :, :n]) if v_norms is None else v_norms
    qf = q[:, :, 0].float()
    selection, log_left, v_left, v_kept = _Selection(), [], [], []
    for b in range(B):
        for h in range(Hkv):
            pick = chosen[b, h * G:(h + 1) * G]
            selection.add(pick)
            left, v_l, v_k = _left_out_by_sketch(qf, sketch, v_up_f, scale, pick, b, h, G)
            log_left.append(left), v_left.append(v_l), v_kept.append(v_k)
    per_head = [torch.cat(x).view(B, Hq) for x in (log_left, v_left, v_kept)]
    return _attend_and_certify(q, qf, k, v, scale, selection.tensors(), *per_head, chosen.sum(-1), None, None,
                               time.perf_counter() - started, tail)


def threshold_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, sketch: KeySketch, *,
                        threshold, scale: float | None = None, v_norms: torch.Tensor | None = None,
                        key_stats=None, tail: int = 0) -> tuple[torch.Tensor, CertifiedInfo]:
    """The paper's fixed-threshold decoding: softmax over the keys the HSR index reports with
    scale * <q, k> >= threshold (a float, in logits, or a (B, Hq) tensor), or, for
    threshold="paper", <q, k> >= hsr.paper_threshold(q, key_stats, n) with key_stats a
    KeyStats per kv head (a list in (b, h) order; computed from k when not given). The
    certificate of the keys below the threshold is computed from the sketch and reported.
    tail: as in certified_attention (the index, sketch and key statistics cover the keys
    before it)."""
    from .index import KeyStats, paper_threshold

    what = "hsr.threshold_attention"
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale, tail)
    _check_index(what, index, B, Hkv, n, D)
    qf = q[:, :, 0].float()
    if isinstance(threshold, str):
        if threshold != "paper":
            raise ValueError(f"{what}: threshold must be a number, a (B, Hq) tensor or 'paper', got {threshold!r}")
        if n < 2:
            raise ValueError(f"{what}: the paper's threshold needs at least 2 keys")
        stats = key_stats if key_stats is not None else \
            [KeyStats.from_keys(k[b, h, :n]) for b in range(B) for h in range(Hkv)]
        raw = torch.stack([paper_threshold(qf[b, h * G:(h + 1) * G], stats[b * Hkv + h], n)
                           for b in range(B) for h in range(Hkv)]).view(B, Hq)
    else:
        t = torch.as_tensor(threshold, dtype=torch.float64)
        if t.numel() not in (1, B * Hq) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: threshold must be finite, a number or ({B}, {Hq}), got {threshold!r}")
        raw = t.expand(B, Hq) / scale if t.numel() == 1 else t.view(B, Hq) / scale
    started = time.perf_counter()
    lims, _, ids = index.range_search(qf, raw.float())
    chosen = _chosen_from_lists(lims, ids, B, Hq, n)
    searched = time.perf_counter() - started
    return _plus_search_time(fixed_set_attention(q, k, v, sketch, chosen, scale=scale, v_norms=v_norms, tail=tail),
                             searched)


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, sketch: KeySketch, *,
                   k_top: int, scale: float | None = None, v_norms: torch.Tensor | None = None,
                   tail: int = 0) -> tuple[torch.Tensor, CertifiedInfo]:
    """Softmax over exactly the k_top highest-scoring keys of each q head (the HSR index's exact
    top-k search), as top-k attention systems do, with the certificate of the rest computed
    from the sketch and reported. tail: as in certified_attention."""
    what = "hsr.topk_attention"
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale, tail)
    _check_index(what, index, B, Hkv, n, D)
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        raise ValueError(f"{what}: k_top must be a positive integer, got {k_top!r}")
    started = time.perf_counter()
    _, ids = index.search(q[:, :, 0].float(), min(k_top, n))
    chosen = torch.zeros(B * Hq, n, dtype=torch.bool)
    chosen.scatter_(1, ids.reshape(B * Hq, -1), True)
    searched = time.perf_counter() - started
    return _plus_search_time(fixed_set_attention(q, k, v, sketch, chosen.view(B, Hq, n), scale=scale,
                                                 v_norms=v_norms, tail=tail), searched)


def _plus_search_time(result, seconds):
    """fixed_set_attention's result with the index search that chose its set (seconds) counted
    as selecting."""
    out, info = result
    return out, replace(info, select_seconds=info.select_seconds + seconds)


def _chosen_from_lists(lims, ids, B, Hq, n):
    """(B, Hq, n) bool from range_search's (lims, ids) over the B * Hq queries."""
    rows = torch.repeat_interleave(torch.arange(B * Hq), lims[1:] - lims[:-1])
    chosen = torch.zeros(B * Hq, n, dtype=torch.bool)
    chosen[rows, ids] = True
    return chosen.view(B, Hq, n)


def _check_index(what, index, B, Hkv, n, D):
    from .index import HSRIndexBatch

    if not isinstance(index, HSRIndexBatch) or (index.batch, index.heads, index.d) != (B, Hkv, D) \
            or not bool((index.ntotal == n).all()):
        raise ValueError(f"{what}: index must be an HSRIndexBatch over k ({B}, {Hkv}, n={n}, {D})")


@dataclass(frozen=True)
class ReportedInfo:
    """keys_reported (B, Hq): keys selected per q head (relu_reported_attention: those the
    index reports; relu_sketch_attention: those whose bound passes, a superset of the keys
    with a positive weight); keys_read (B, Hkv): the union over the GQA group; index_stats:
    the index's IndexStats (relu_reported_attention), (nodes visited, leaves opened, keys
    sketched, boxes read) int64 (relu_sketch_attention with an index) or None; the selection."""

    keys_reported: torch.Tensor
    keys_read: torch.Tensor
    index_stats: object
    offsets: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    # (B, Hq) float32: log of each row's sum of ReLU weights, to merge with other keys.
    lse: torch.Tensor


def _relu_over(selection, q, k, v, scale, alpha, bias, normalize, counts, stats):
    """ReLU attention over the selected keys (offsets, ids, mask), with the ReportedInfo both
    ReLU paths return."""
    offsets_t, ids_t, mask_t = selection
    out, lse = sparse_attention(q, k, v, offsets_t, ids_t, mask_t, kind="relu", scale=scale, alpha=alpha,
                                bias=float(bias), normalize=normalize, return_lse=True)
    keys_read = (offsets_t[1:] - offsets_t[:-1]).view(k.shape[0], k.shape[1])
    return out, ReportedInfo(counts, keys_read, stats, offsets_t, ids_t, mask_t, lse[:, :, 0])


def relu_reported_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, *, bias: float,
                            alpha: int = 1, scale: float | None = None,
                            normalize: bool = True) -> tuple[torch.Tensor, ReportedInfo]:
    """ReLU^alpha attention of decode queries q (B, Hq, 1, D) that reads only the keys the HSR
    index reports: A = relu(scale * <q, k> - bias) ** alpha is non-zero exactly where
    <q, k> > bias / scale, a half-space query. The result equals dense ReLU attention
    (hsr.attention(kind="relu")) up to float rounding (a key within rounding of the threshold
    may be reported by one and not the other; its weight is then of the order of the rounding).

    index: hsr.HSRIndexBatch over k (ids = positions), e.g. HSRIndexBatch(k.float()).
    """
    what = "hsr.relu_reported_attention"
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale)
    _check_index(what, index, B, Hkv, n, D)
    _check_bias(what, bias)
    offsets, ids, mask, counts = index.range_union(q[:, :, 0].float(), float(bias) / scale)
    return _relu_over((offsets, ids, mask), q, k, v, scale, alpha, bias, normalize, counts, index.last_stats)


def relu_sketch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sketch: KeySketch, *, bias: float,
                          alpha: int = 1, scale: float | None = None, normalize: bool = True,
                          index=None) -> tuple[torch.Tensor, ReportedInfo]:
    """ReLU^alpha attention of decode queries q (B, Hq, 1, D) that reads in full only the
    keys whose sketch upper bound passes the threshold: a key with scale * upper <= bias has
    weight exactly 0, so the result equals dense ReLU attention up to float rounding (as
    relu_reported_attention, with the sketch instead of float32 keys).

    index: an hsr.HSRIndexBatch over k (ids = positions; it need not keep its points): the
    tree first drops whole nodes whose upper bound is at most bias (and keeps whole nodes
    whose lower bound passes), and only the keys of the leaves left undecided have their
    sketch scored; info.index_stats is then (nodes visited, leaves opened, keys sketched,
    nodes whose box was read: the walk stops reading boxes that rarely settle a node), else None (every key's sketch is scored). info.keys_reported counts the keys selected
    per q head (those that can have a positive weight)."""
    what = "hsr.relu_sketch_attention"
    B, Hq, Hkv, n, D, G, scale = _decode_problem(what, q, k, v, scale)
    _check_sketch(what, sketch, B, Hkv, n, D)
    _check_bias(what, bias)
    if index is not None:
        _check_index(what, index, B, Hkv, n, D)
    offsets_t, ids_t, mask_t, counts, stats = relu_sketch_select(q[:, :, 0].float(), sketch, scale, bias, index)
    return _relu_over((offsets_t, ids_t, mask_t), q, k, v, scale, alpha, bias, normalize, counts, stats)


def relu_sketch_select(qf: torch.Tensor, sketch: KeySketch, scale: float, bias: float, index=None):
    """relu_sketch_attention's selection for queries qf (B, Hq, D) float32, unchecked (the
    caller owns consistent arguments, as HSRKVCache does): (offsets, ids, mask, keys selected
    per (batch, q head), index_stats or None)."""
    if index is None:
        return (*torch.ops.hsr.sketch_relu_select(qf, sketch.codes, sketch.lo, sketch.delta, sketch.bits,
                                                  sketch.group, scale, float(bias)), None)
    return index._impl.relu_select(qf, sketch.codes, sketch.lo, sketch.delta, sketch.bits, sketch.group, scale,
                                   float(bias))
