"""hsr.KeySketch: the certified score interval of every key, against exact inner products."""

import pytest
import torch

import hsr

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def exact_scores(q, k):
    """<q, k> in float64 and a bound on its own error: products of float32 values are exact in
    float64, and a float64 sum of D terms is within D * 2^-53 * sum|terms| of the exact sum."""
    qd, kd = q.double(), k.double()
    s = qd @ kd.T
    err = q.shape[1] * 2.0 ** -53 * (qd.abs() @ kd.abs().T)
    return s, err


def assert_bounds_hold(q, k, bits, group):
    sk = hsr.KeySketch.from_keys(k, bits=bits, group=group)
    lower, upper = sk.score_bounds(q)
    s, err = exact_scores(q, k.float())
    assert torch.all(lower.double() <= s + err), f"lower bound violated by {float((lower.double() - s).max())}"
    assert torch.all(s - err <= upper.double()), f"upper bound violated by {float((s - upper.double()).max())}"
    return sk, lower, upper


def make_keys(kind, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        k = torch.randn(n, d, generator=g)
    elif kind == "outlier_channel":  # one huge channel per group: the step is set by it
        k = torch.randn(n, d, generator=g)
        k[:, ::32] *= 1000
    elif kind == "constant_groups":  # every group constant: zero steps
        k = torch.randn(n, 1, generator=g).expand(n, d).contiguous()
    elif kind == "huge":
        k = torch.randn(n, d, generator=g) * 1e15
    elif kind == "tiny":  # includes float32 subnormals
        k = torch.randn(n, d, generator=g) * 1e-39
    elif kind == "mixed_scale":  # keys of very different norms, negative and positive
        k = torch.randn(n, d, generator=g) * torch.logspace(-6, 6, n).unsqueeze(1)
    elif kind == "two_values":  # codes at the ends of the range only
        k = torch.where(torch.rand(n, d, generator=g) < 0.5, -3.0, 5.0)
    else:
        raise ValueError(kind)
    if dtype == torch.float16:
        k = k.clamp(-6e4, 6e4)
    return k.to(dtype)


KINDS = ["gaussian", "outlier_channel", "constant_groups", "huge", "tiny", "mixed_scale", "two_values"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_bounds_contain_the_exact_score(kind, dtype, bits):
    k = make_keys(kind, 97, 128, dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 128, generator=g)
    q[0] = 0.0  # a zero query: the interval is a point
    q[1] *= 1e6
    q[2, ::2] = 0.0
    assert_bounds_hold(q, k, bits, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_worst_case_quantization_error_is_covered(bits):
    # Each group spans [0, levels] (step just above 1), and every other channel sits half a
    # step above a level: the error is (almost) step/2 in every channel, with one sign, and
    # the query weighs every channel by +1, so the errors add up to the bound.
    levels = (1 << bits) - 1
    d = 64
    k = torch.arange(d, dtype=torch.float32).remainder(levels) + 0.5
    k = k.view(2, 32)
    k[:, 0], k[:, 1] = 0.0, float(levels)
    k = k.reshape(1, d).repeat(3, 1)
    k[1] *= -1
    q = torch.ones(2, d)
    q[1] = -1.0
    sk, lower, upper = assert_bounds_hold(q, k, bits, 32)
    s, _ = exact_scores(q, k)
    err = (sk.dequantize().double() - k.double()) @ q.double().T  # (n, m) signed error
    assert err.abs().max() > 0.45 * (d - 4)  # the construction really is the worst case


@pytest.mark.parametrize("d,group", [(1, 32), (33, 32), (64, 32), (64, 16), (70, 32), (97, 16), (128, 1), (128, 48),
                                     (128, 128), (100, 1000), (256, 32)])
@pytest.mark.parametrize("bits", [8, 4])
def test_awkward_dims_and_groups(d, group, bits):
    g = torch.Generator().manual_seed(d)
    k = torch.randn(65, d, generator=g) * 3 + 1
    q = torch.randn(5, d, generator=g)
    sk, lower, upper = assert_bounds_hold(q, k, bits, group)
    groups = -(-d // min(group, d))
    assert sk.codes.shape == (65, d if bits == 8 else (d + 1) // 2)
    assert sk.lo.shape == sk.delta.shape == (65, groups)


@pytest.mark.parametrize("bits", [8, 4])
def test_reconstruction_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(200, 70, generator=g) * 5
    sk = hsr.KeySketch.from_keys(k, bits=bits, group=32)
    step = sk.delta[:, torch.arange(70) // 32]
    err = (sk.dequantize().double() - k.double()).abs()
    # Half a step, plus the float rounding of lo + code * step in dequantize().
    slack = 2 * 2.0 ** -24 * (sk.lo[:, torch.arange(70) // 32].abs() + ((1 << bits) - 1) * step)
    assert torch.all(err <= 0.5 * step.double() + slack.double())
    # The levels cover each group's range, starting at its minimum.
    levels = (1 << bits) - 1
    for gi, (a, b) in enumerate([(0, 32), (32, 64), (64, 70)]):
        part = k[:, a:b].double()
        assert torch.equal(sk.lo[:, gi].double(), part.amin(1))
        assert torch.all(sk.delta[:, gi].double() * levels >= part.amax(1) - part.amin(1))


def test_intervals_are_tight_enough_to_select():
    # int8, groups of 32, Gaussian keys: the half-width is about sum_g delta_g/2 |q_g|_1.
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1000, 128, generator=g)
    q = torch.randn(4, 128, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    estimate, radius = sk.score_intervals(q)
    qa = q.abs().view(4, 4, 32).sum(-1)  # (m, groups)
    quant = (qa.unsqueeze(1) * sk.delta.unsqueeze(0)).sum(-1) / 2  # (m, n)
    assert torch.all(radius >= quant * (1 - 1e-6))
    assert torch.all(radius <= quant * 1.01 + 1e-3)
    s, _ = exact_scores(q, k)
    assert (estimate.double() - s).abs().max() <= radius.max()
    # The intervals separate the top keys from the bulk: the best key's lower bound beats
    # most keys' upper bounds.
    lower, upper = sk.score_bounds(q)
    best_lower = lower.max(dim=1).values
    assert ((upper < best_lower.unsqueeze(1)).float().mean(dim=1) > 0.9).all()


def test_int4_packs_two_channels_per_byte():
    k = torch.tensor([[0.0, 15.0, 5.0]])  # one group: lo 0, step 1 (one ulp up): codes 0, 15, 5
    sk = hsr.KeySketch.from_keys(k, bits=4, group=32)
    assert sk.codes.tolist() == [[0 | 15 << 4, 5]]
    assert float(sk.lo) == 0.0 and 1.0 < float(sk.delta) < 1.0 + 1e-6
    assert torch.allclose(sk.dequantize(), k, atol=1e-5)


def test_leading_dimensions_and_determinism():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 50, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)
    a = hsr.KeySketch.from_keys(k)
    b = hsr.KeySketch.from_keys(k.clone())
    assert a.codes.shape == (2, 3, 50, 64) and a.lo.shape == (2, 3, 50, 2)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.lo, b.lo) and torch.equal(a.delta, b.delta)
    one = hsr.KeySketch.from_keys(k[1, 2])
    assert torch.equal(one.codes, a.codes[1, 2]) and torch.equal(one.delta, a.delta[1, 2])
    # Non-contiguous keys give the same sketch.
    nc = hsr.KeySketch.from_keys(k.transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.equal(nc.codes, a.codes)
    assert a.nbytes == 2 * 3 * 50 * (64 + 2 * 4 + 2 * 4)


def test_empty_inputs():
    sk = hsr.KeySketch.from_keys(torch.empty(0, 64))
    assert sk.codes.shape == (0, 64)
    e, r = sk.score_intervals(torch.randn(3, 64))
    assert e.shape == r.shape == (3, 0)
    sk = hsr.KeySketch.from_keys(torch.randn(5, 64))
    e, r = sk.score_intervals(torch.empty(0, 64))
    assert e.shape == (0, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_keys_raise(bad):
    k = torch.randn(10, 64)
    k[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        hsr.KeySketch.from_keys(k)
    sk = hsr.KeySketch.from_keys(torch.randn(10, 64))
    q = torch.randn(2, 64)
    q[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        sk.score_intervals(q)


def test_bad_arguments_raise():
    k = torch.randn(10, 64)
    with pytest.raises(ValueError, match="bits"):
        hsr.KeySketch.from_keys(k, bits=3)
    with pytest.raises(ValueError, match="group"):
        hsr.KeySketch.from_keys(k, group=0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        torch.ops.hsr.sketch_keys(k.double())
    with pytest.raises(ValueError, match="bits"):
        torch.ops.hsr.sketch_keys(k, 2, 32)
    sk = hsr.KeySketch.from_keys(k)
    with pytest.raises(ValueError, match="codes must be uint8"):
        sk.score_intervals(torch.randn(2, 65))
    with pytest.raises(ValueError, match="float32"):
        sk.score_intervals(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="lo must be"):
        torch.ops.hsr.sketch_score_intervals(torch.randn(2, 64), sk.codes, sk.lo[:5], sk.delta, 8, 32)
    with pytest.raises(ValueError, match="codes must be uint8"):
        torch.ops.hsr.sketch_score_intervals(torch.randn(2, 64), sk.codes, sk.lo, sk.delta, 4, 32)
    batched = hsr.KeySketch.from_keys(torch.randn(2, 10, 64))
    with pytest.raises(ValueError, match="index it first"):
        batched.score_intervals(torch.randn(2, 64))


def test_opcheck():
    k = torch.randn(20, 40, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.hsr.sketch_keys.default, (k, 4, 16))
    codes, lo, delta = torch.ops.hsr.sketch_keys(k.float(), 8, 32)
    torch.library.opcheck(torch.ops.hsr.sketch_score_intervals.default,
                          (torch.randn(3, 40), codes, lo, delta, 8, 32))
