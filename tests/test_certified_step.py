"""The certified decode step in one call (HSRIndexBatch.certified_attend for the tree and tree +
sketch selections, hsr::sketch_certified_attend for the sketch alone): the same selection,
output and certificate as the operators it replaces, called one after the other."""

import pytest
import torch

import hsr
from hsr.certified import value_norm_bounds
from attention_cases import clustered_keys
from reference import attention_ref


def make(B, Hkv, G, n, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = clustered_keys(B, Hkv, n, D, 16, g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    q = 3 * torch.randn(B, Hkv * G, 1, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def step_parts(select, q, k, n):
    """The sketch (or None), index (or None), value and key norm bounds of the first n keys."""
    sketch = None if select == "tree" else hsr.KeySketch.from_keys(k[:, :, :n])
    index = None if select == "sketch" else hsr.HSRIndexBatch(k[:, :, :n].float(), keep_points=False)
    return sketch, index


def fused_step(select, sketch, index, q, k, v, v_norms, k_norms, positions, n, scale, eps):
    if select == "sketch":
        return torch.ops.hsr.sketch_certified_attend(q, sketch.codes, sketch.lo, sketch.delta, sketch.bits,
                                                     sketch.group, v_norms, k_norms, k, v, positions, scale, eps)
    codes = (None, None, None) if sketch is None else (sketch.codes, sketch.lo, sketch.delta)
    return index._impl.certified_attend(q, *codes, 8, 32, v_norms, v_norms.amax(-1), k_norms, k, v, positions, n,
                                        scale, eps)


def composed_step(select, sketch, index, q, k, v, v_norms, k_norms, n, scale, eps):
    """The same step as separate operator calls (selection, tail, kernel, certificate)."""
    qf = q[:, :, 0].float()
    if select == "sketch":
        sel = torch.ops.hsr.sketch_select(qf, sketch.codes, sketch.lo, sketch.delta, sketch.bits, sketch.group,
                                          v_norms, scale, eps)
        stats = None
    else:
        codes = (None, None, None) if sketch is None else (sketch.codes, sketch.lo, sketch.delta)
        *sel, stats = index._impl.certified_select(qf, *codes, 8, 32, v_norms, v_norms.amax(-1), scale, eps)
    offsets, ids, mask, log_left, v_left, v_kept, kept = sel
    tail = k.shape[2] - n
    every = torch.ops.hsr.selection_with_tail(offsets, ids, mask, n, n + tail)
    out, lse = torch.ops.hsr.sparse_attention(q, k, v, *every, scale=scale)
    mass, error, v_kept = torch.ops.hsr.softmax_certificate(qf, lse[:, :, 0], *every, k, k_norms, v, n, log_left,
                                                            v_left, v_kept, kept + tail, scale)
    return out, lse[:, :, 0], mass, error, offsets, ids, mask, kept + tail, every[0].diff(), v_left, v_kept, stats


@pytest.mark.parametrize("select", ["tree+sketch", "tree", "sketch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G,n,tail,D", [(1, 97, 0, 48), (3, 1025, 30, 24), (4, 1, 5, 7), (2, 300, 63, 128)])
def test_the_step_in_one_call_equals_its_parts_called_in_turn(select, dtype, G, n, tail, D):
    B, H = 2, 2
    q, k, v = make(B, H, G, n + tail, D, dtype, seed=n + D)
    sketch, index = step_parts(select, q, k, n)
    v_norms = value_norm_bounds(v[:, :, :n])
    k_norms = value_norm_bounds(k[:, :, :n])
    scale, eps = D ** -0.5, 1e-2
    g = torch.Generator().manual_seed(1)
    positions = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H)]).view(B, H, n)
    got = fused_step(select, sketch, index, q, k, v, v_norms, k_norms, positions, n, scale, eps)
    out, lse, mass, error, offsets, ids, mask, kept, read, v_left, v_kept, stats, select_seconds = got
    want = composed_step(select, sketch, index, q, k, v, v_norms, k_norms, n, scale, eps)
    w_out, w_lse, w_mass, w_error, w_offsets, w_ids, w_mask, w_kept, w_read, w_v_left, w_v_kept, w_stats = want
    assert torch.equal(out, w_out) and torch.equal(lse, w_lse)
    assert torch.equal(mass, w_mass) and torch.equal(error, w_error)
    assert torch.equal(offsets, w_offsets) and torch.equal(mask, w_mask)
    pair = torch.repeat_interleave(torch.arange(B * H), w_offsets.diff())
    assert torch.equal(ids, positions.view(B * H, n)[pair, w_ids])  # reported as arrival positions
    assert torch.equal(kept, w_kept) and torch.equal(read, w_read.view(B, H))
    assert torch.equal(v_left, w_v_left) and torch.equal(v_kept, w_v_kept)
    if select == "sketch":
        assert stats.tolist() == [0, 0, B * H * n, 0]
    else:
        assert torch.equal(stats, w_stats)
    assert select_seconds > 0
    # Without positions the ids are the stored rows.
    rows = fused_step(select, sketch, index, q, k, v, v_norms, None, None, n, scale, eps)[5]
    assert torch.equal(rows, w_ids)
    # And the certificate holds against fp64 dense attention.
    ref, _ = attention_ref(q.double(), k.double(), v.double(), scale=scale)
    err = (out.double() - ref).norm(dim=-1)[:, :, 0]
    rounding = 1e-5 if dtype == torch.float32 else 2e-2
    assert bool((mass <= eps).all()) and bool((err <= error + rounding).all())


def test_eps_zero_reads_every_key():
    q, k, v = make(1, 2, 2, 200, 32, torch.float32)
    for select in ("tree+sketch", "tree", "sketch"):
        sketch, index = step_parts(select, q, k, 150)
        v_norms = value_norm_bounds(v[:, :, :150])
        out, _, mass, error, *_, read, _, _, _, _ = fused_step(select, sketch, index, q, k, v, v_norms, None, None,
                                                               150, 32 ** -0.5, 0.0)
        assert torch.equal(read, torch.full((1, 2), 200)) and bool((mass == 0).all()) and bool((error == 0).all())
        torch.testing.assert_close(out, hsr.attention(q, k, v), atol=1e-6, rtol=1e-5)


def bad_step_cases(q, k, v, positions):
    """(change, message) pairs, each one bad argument of a step over the first 80 of 100 keys."""
    return [
        (dict(q=q[:, :, 0]), r"q must be \(B, Hq, 1, D\)"),
        (dict(q=q * float("nan")), "q contains NaN or Inf"),
        (dict(q=q.double()), "dtype"),
        (dict(q=q[:, :3]), "q heads"),
        (dict(k=k[:, :, :60], v=v[:, :, :60]), "Lk"),
        (dict(v=v[:, :, :90]), "v"),
        (dict(positions=positions.float()), "positions"),
        (dict(positions=positions[:, :, :40]), "positions"),
        (dict(eps=1.0), "eps must be in"),
        (dict(eps=-0.1), "eps must be in"),
        (dict(scale=0.0), "scale")]


def test_bad_input_raises_a_clear_error():
    q, k, v = make(1, 2, 2, 100, 16, torch.float32)
    positions = torch.arange(80).expand(1, 2, 80).contiguous()
    ok = dict(q=q, k=k, v=v, positions=positions, eps=0.01, scale=0.25)
    for select in ("tree+sketch", "sketch"):
        sketch, index = step_parts(select, q, k, 80)
        v_norms = value_norm_bounds(v[:, :, :80])
        for change, message in bad_step_cases(q, k, v, positions):
            a = {**ok, **change}
            with pytest.raises(ValueError, match=message):
                fused_step(select, sketch, index, a["q"], a["k"], a["v"], v_norms, None, a["positions"], 80,
                           a["scale"], a["eps"])
        with pytest.raises(ValueError, match="v_norms"):
            fused_step(select, sketch, index, q, k, v, v_norms[:, :, :40], None, None, 80, 0.25, 0.01)
        with pytest.raises(ValueError, match="k_norms"):
            fused_step(select, sketch, index, q, k, v, v_norms, v_norms[:, :, :40], None, 80, 0.25, 0.01)
    sketch, index = step_parts("tree+sketch", q, k, 80)
    v_norms = value_norm_bounds(v[:, :, :80])
    attend = index._impl.certified_attend
    for tail_begin in (79, 101):
        with pytest.raises(ValueError, match="tail_begin must lie in"):
            attend(q, sketch.codes, sketch.lo, sketch.delta, 8, 32, v_norms, v_norms.amax(-1), None, k, v, None,
                   tail_begin, 0.25, 0.01)
    with pytest.raises(ValueError, match="together"):
        attend(q, sketch.codes, None, sketch.delta, 8, 32, v_norms, v_norms.amax(-1), None, k, v, None, 80, 0.25, 0.01)
    with pytest.raises(ValueError, match="v_norm_max"):
        attend(q, sketch.codes, sketch.lo, sketch.delta, 8, 32, v_norms, v_norms, None, k, v, None, 80, 0.25, 0.01)
    with pytest.raises(ValueError, match=r"k must be \(1, 2, Lk, 16\) as the index"):
        attend(q, sketch.codes, sketch.lo, sketch.delta, 8, 32, v_norms, v_norms.amax(-1), None, k[:, :1], v[:, :1],
               None, 80, 0.25, 0.01)
    sketch = hsr.KeySketch.from_keys(k[:, :, :80])
    with pytest.raises(ValueError, match="codes must be"):
        torch.ops.hsr.sketch_certified_attend(q, sketch.codes[..., :8], sketch.lo, sketch.delta, 8, 32, v_norms, None,
                                              k, v, None, 0.25, 0.01)
    # k must hold the sketch's keys (its first rows) and have its heads.
    with pytest.raises(ValueError, match=r"k must be \(1, 1, Lk >= 80, 16\) as the sketch"):
        torch.ops.hsr.sketch_certified_attend(q, sketch.codes[:, :1], sketch.lo[:, :1], sketch.delta[:, :1], 8,
                                              32, v_norms[:, :1], None, k, v, None, 0.25, 0.01)


def test_sketch_certified_attend_opcheck():
    q, k, v = make(1, 2, 3, 90, 40, torch.bfloat16)
    sketch = hsr.KeySketch.from_keys(k[:, :, :70])
    v_norms, k_norms = value_norm_bounds(v[:, :, :70]), value_norm_bounds(k[:, :, :70])
    positions = torch.arange(70).flip(0).expand(1, 2, 70).contiguous()
    # Not test_aot_dispatch_*: they compare two runs' outputs, and the last one is a timing.
    torch.library.opcheck(torch.ops.hsr.sketch_certified_attend.default,
                          (q, sketch.codes, sketch.lo, sketch.delta, 8, 32, v_norms, k_norms, k, v, positions,
                           40 ** -0.5, 1e-2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
