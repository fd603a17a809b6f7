"""The quantized key sketch (DESIGN 4a): int8 or int4 codes per key with, per group of
channels, an offset and a step, giving every key a certified score interval for any query.

    sk = hsr.KeySketch.from_keys(k, bits=8, group=32)    # k (..., n, D)
    lower, upper = sk.score_bounds(q)                    # q (m, D), keys (n, D): (m, n) each

For every query and key, lower <= <q, k> <= upper holds for the exact real-number inner
product of q (float32) and the key as stored (its float32, float16 or bfloat16 value):
quantization contributes sum_g delta_g / 2 * |q_g|_1 and the float rounding of the sketch
score is bounded and added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _layout(d: int, bits: int, group: int, what: str) -> tuple[int, int]:
    """(code bytes per key, groups per key); validates like the C++ op does."""
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"{what}: bits must be 8 or 4, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{what}: group must be a positive integer, got {group!r}")
    if d < 1:
        raise ValueError(f"{what}: the key dimension must be >= 1, got {d}")
    group = min(group, d)
    return (d if bits == 8 else (d + 1) // 2), -(-d // group)


@torch.library.register_fake("hsr::sketch_keys")
def _sketch_keys_fake(k, bits=8, group=32):
    if k.dim() < 1:
        raise ValueError("hsr.sketch_keys: k must have at least one dimension (..., D)")
    code_bytes, groups = _layout(k.shape[-1], bits, group, "hsr.sketch_keys")
    lead = tuple(k.shape[:-1])
    return (k.new_empty(lead + (code_bytes,), dtype=torch.uint8),
            k.new_empty(lead + (groups,), dtype=torch.float32),
            k.new_empty(lead + (groups,), dtype=torch.float32))


@torch.library.register_fake("hsr::sketch_score_intervals")
def _sketch_score_intervals_fake(q, codes, lo, delta, bits=8, group=32):
    if q.dim() != 2 or codes.dim() != 2:
        raise ValueError("hsr.sketch_score_intervals: q must be (m, D) and codes (n, code_bytes)")
    _layout(q.shape[1], bits, group, "hsr.sketch_score_intervals")
    shape = (q.shape[0], codes.shape[0])
    return q.new_empty(shape), q.new_empty(shape)


@torch.library.register_fake("hsr::select_by_bounds")
def _select_by_bounds_fake(estimate, radius, v_norms, scale, eps):
    if estimate.dim() != 2 or radius.shape != estimate.shape or v_norms.shape != (estimate.shape[1],):
        raise ValueError("hsr.select_by_bounds: estimate and radius must be (rows, n), v_norms (n,)")
    rows = estimate.shape[0]
    return (estimate.new_empty(estimate.shape, dtype=torch.bool), estimate.new_empty(rows, dtype=torch.float64),
            estimate.new_empty(rows, dtype=torch.float64), estimate.new_empty(rows, dtype=torch.float64))


def _check_sketch_select_shapes(what, q, codes, lo, delta, bits, group):
    if q.dim() != 3 or codes.dim() != 4 or lo.dim() != 4 or delta.dim() != 4 or codes.shape[0] != q.shape[0] \
            or codes.shape[1] < 1 or q.shape[1] % codes.shape[1]:
        raise ValueError(f"{what}: q must be (B, Hq, D) and codes (B, Hkv, n, code_bytes) with Hq a multiple of Hkv")
    _layout(q.shape[2], bits, group, what)
    return q.shape[0], q.shape[1], codes.shape[1], q.shape[1] // codes.shape[1]


def _selection_fake(q, B, Hkv, G):
    """offsets, ids and mask of a selection whose size is known only after running."""
    total = torch.library.get_ctx().new_dynamic_size()
    return (q.new_empty(B * Hkv + 1, dtype=torch.int64), q.new_empty(total, dtype=torch.int64),
            q.new_empty((total, G), dtype=torch.bool))


@torch.library.register_fake("hsr::sketch_select")
def _sketch_select_fake(q, codes, lo, delta, bits, group, v_norms, scale, eps):
    B, Hq, Hkv, G = _check_sketch_select_shapes("hsr.sketch_select", q, codes, lo, delta, bits, group)
    per_head = [q.new_empty((B, Hq), dtype=torch.float64) for _ in range(3)]
    return (*_selection_fake(q, B, Hkv, G), *per_head, q.new_empty((B, Hq), dtype=torch.int64))


@torch.library.register_fake("hsr::sketch_select_estimate")
def _sketch_select_estimate_fake(q, codes, lo, delta, bits, group, v_norms, scale, eps, block):
    B, Hq, Hkv, G = _check_sketch_select_shapes("hsr.sketch_select_estimate", q, codes, lo, delta, bits, group)
    if block < 1:
        raise ValueError(f"hsr.sketch_select_estimate: block must be a positive number of keys, got {block}")
    blocks = -(-codes.shape[2] // block)
    per_head = [q.new_empty((B, Hq), dtype=torch.float64) for _ in range(3)]
    return (*_selection_fake(q, B, Hkv, G), *per_head, q.new_empty((B, Hq), dtype=torch.int64),
            q.new_empty((B, Hq, blocks), dtype=torch.float64), q.new_empty((B, Hq), dtype=torch.float64))


@torch.library.register_fake("hsr::sketch_relu_select")
def _sketch_relu_select_fake(q, codes, lo, delta, bits, group, scale, bias):
    B, Hq, Hkv, G = _check_sketch_select_shapes("hsr.sketch_relu_select", q, codes, lo, delta, bits, group)
    return (*_selection_fake(q, B, Hkv, G), q.new_empty((B, Hq), dtype=torch.int64))


@torch.library.register_fake("hsr::sketch_certified_attend")
def _sketch_certified_attend_fake(q, codes, lo, delta, bits, group, v_norms, k_norms, k, v, positions, scale, eps):
    what = "hsr.sketch_certified_attend"
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: q must be (B, Hq, 1, D) and k, v (B, Hkv, Lk, D)")
    B, Hq, Hkv, G = _check_sketch_select_shapes(what, q[:, :, 0], codes, lo, delta, bits, group)
    per_head = [q.new_empty((B, Hq), dtype=t) for t in (torch.float32, torch.float64, torch.float64)]
    counts = (q.new_empty((B, Hq), dtype=torch.int64), q.new_empty((B, Hkv), dtype=torch.int64))
    norms = [q.new_empty((B, Hq), dtype=torch.float64) for _ in range(2)]
    # The time the selection took is known only after running.
    return (q.new_empty((B, Hq, 1, v.shape[3])), *per_head, *_selection_fake(q, B, Hkv, G), *counts, *norms,
            q.new_empty(4, dtype=torch.int64), 0.0)


@dataclass(frozen=True)
class KeySketch:
    """Sketch of keys (..., D): codes (..., code_bytes) uint8, lo and delta (..., groups)."""

    codes: torch.Tensor
    lo: torch.Tensor
    delta: torch.Tensor
    dim: int
    bits: int = 8
    group: int = 32

    @classmethod
    def from_keys(cls, k: torch.Tensor, bits: int = 8, group: int = 32) -> "KeySketch":
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"KeySketch.from_keys: k must be a torch.Tensor, got {type(k).__name__}")
        if k.dim() < 1:
            raise ValueError("KeySketch.from_keys: k must have at least one dimension (..., D)")
        _layout(k.shape[-1], bits, group, "KeySketch.from_keys")
        codes, lo, delta = torch.ops.hsr.sketch_keys(k, bits, group)
        return cls(codes, lo, delta, int(k.shape[-1]), bits, min(group, int(k.shape[-1])))

    @property
    def nbytes(self) -> int:
        """Bytes the sketch occupies (codes, offsets and steps)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.lo, self.delta))

    def score_intervals(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, radius), each (m, n), for q (m, D) against a sketch of keys (n, D):
        the exact <q, k> lies in [estimate - radius, estimate + radius]."""
        if self.codes.dim() != 2:
            raise ValueError(f"KeySketch.score_intervals: the sketch must hold keys (n, D), got codes of "
                             f"shape {tuple(self.codes.shape)}; index it first")
        return torch.ops.hsr.sketch_score_intervals(q, self.codes, self.lo, self.delta, self.bits, self.group)

    def score_bounds(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper), each (m, n): lower <= <q, k> <= upper for every query and key."""
        estimate, radius = self.score_intervals(q)
        # Subtracting/adding in float rounds; one ulp outward keeps the bounds certified.
        inf = torch.tensor(float("inf"))
        return (torch.nextafter(estimate - radius, -inf), torch.nextafter(estimate + radius, inf))

    def dequantize(self) -> torch.Tensor:
        """k_hat (..., D) float32: the keys as the sketch sees them (float32 arithmetic)."""
        d, g = self.dim, self.group
        if self.bits == 8:
            codes = self.codes.to(torch.float32)
        else:
            lo_nib = (self.codes & 15).to(torch.float32)
            hi_nib = (self.codes >> 4).to(torch.float32)
            codes = torch.stack([lo_nib, hi_nib], dim=-1).flatten(-2)[..., :d]
        group_of = torch.arange(d) // g
        return self.lo[..., group_of] + codes * self.delta[..., group_of]
