"""hsr.HSRKVCache: decode after prefill against dense attention over every key so far."""

import math
import time

import pytest
import torch

import hsr
from attention_cases import clustered_keys
from reference import attention_ref


def stream(kind, B, Hkv, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "clustered":
        k = clustered_keys(B, Hkv, L, D, 6, g)
    else:
        k = torch.randn(B, Hkv, L, D, generator=g)
    return k, torch.randn(B, Hkv, L, D, generator=g), g


def left_out_mass(q, k, selection, indexed):
    """(B, Hq): the exact softmax mass of the keys a decode step did not attend (neither
    selected among the indexed keys nor in the tail)."""
    B, Hq, _, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = Hq // Hkv
    offsets, ids, mask = selection
    out = torch.zeros(B, Hq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            rows = slice(int(offsets[b * Hkv + h]), int(offsets[b * Hkv + h + 1]))
            for gi in range(G):
                p = torch.softmax((k[b, h].double() @ q[b, h * G + gi, 0].double()) / math.sqrt(D), 0)
                seen = torch.zeros(n, dtype=torch.bool)
                seen[ids[rows][mask[rows, gi]]] = True
                seen[indexed:] = True
                out[b, h * G + gi] = p[~seen].sum()
    return out


@pytest.mark.parametrize("select", ["tree+sketch", "sketch", "tree"])
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_softmax_bounds_hold_over_many_steps_with_flushes(kind, eps, select):
    B, Hkv, G, D, prompt, steps = 2, 2, 3, 64, 90, 40
    k, v, g = stream(kind, B, Hkv, prompt + steps, D)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=16, policy=hsr.Softmax(eps=eps, select=select),
                           dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    assert cache.indexed_length == 80 and cache.length == prompt
    for t in range(prompt, prompt + steps):
        q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert cache.length == t + 1 and cache.indexed_length % 16 == 0
        assert cache.length - cache.indexed_length < 16
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        err = (out.double() - ref).norm(dim=-1)[..., 0]  # (B, Hq)
        assert (info.mass_bound <= eps).all()
        assert (err <= info.error_bound + 1e-5).all(), f"step {t}: {float((err - info.error_bound).max())}"
        tv = left_out_mass(q, k[:, :, :t + 1], info.selection, cache.indexed_length)
        assert (tv <= info.mass_bound * (1 + 1e-9) + 1e-300).all()
        assert (info.keys_attended <= t + 1).all() and (info.keys_read <= t + 1).all()
        assert info.bytes_read > 0 and info.seconds > 0


@pytest.mark.parametrize("select", ["tree+sketch", "sketch", "tree"])
def test_a_certified_step_counts_the_bytes_it_read(select):
    # K and V of every key read (the tail's included), then: the sketch (codes, lo, delta) and
    # value-norm bound of every indexed key (sketch); the node summaries the walk read and the
    # sketch and value-norm bound of the keys in the leaves it opened (tree+sketch), or the
    # value-norm bounds of the indexed keys it kept (tree, no sketch).
    B, Hkv, G, D, prompt = 2, 2, 2, 40, 150
    k, v, g = stream("clustered", B, Hkv, prompt + 1, D, seed=4)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=16, policy=hsr.Softmax(eps=1e-2, select=select),
                           dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    out, info = cache.decode(q, k[:, :, prompt:], v[:, :, prompt:])
    n, tail = cache.indexed_length, cache.length - cache.indexed_length
    key_bytes = 2 * D * 4
    sketch_bytes = D + 2 * 4 * 2  # int8 codes, then lo and delta for two groups of 32 channels
    want = int(info.keys_read.sum()) * key_bytes
    if select == "sketch":
        want += B * Hkv * n * (sketch_bytes + 4)
    else:  # the same walk again, for its counts
        sk = None if select == "tree" else cache._sketch
        codes = (None, None, None) if sk is None else (sk.codes, sk.lo, sk.delta)
        *_, stats = cache._index._impl.certified_select(q[:, :, 0], *codes, 8, 32, cache._v_norms, cache._v_norm_max,
                                                        D ** -0.5, 1e-2 * (1 - 1e-3))
        nodes, _, sketched, boxes = stats.tolist()
        opened = sketched * (sketch_bytes + 4) if select == "tree+sketch" else \
            (int(info.keys_read.sum()) - B * Hkv * tail) * 4
        want += (nodes + 2 * boxes) * D * 4 + opened
    assert info.bytes_read == want


@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-3, select="tree+sketch"), hsr.TopK(12),
                                    hsr.ReLU(alpha=2, bias=0.3, select="tree+sketch")])
def test_half_caches_select_as_a_float32_cache_of_the_same_values(policy):
    # float16 and bfloat16 keys reach the sketch, the norm bounds and the trees as they are
    # stored (no float32 copy): a cache of values exact in both dtypes selects the same keys
    # as a float32 cache of them, through a prefill, leaf flushes and a rebuild.
    B, Hkv, G, D, prompt, steps = 1, 2, 2, 97, 150, 60
    k, v, g = stream("clustered", B, Hkv, prompt + steps, D, seed=3)
    k, v = k.to(torch.bfloat16).to(torch.float16).float(), v.to(torch.bfloat16).float()
    caches = {dt: hsr.HSRKVCache(B, Hkv, D, dtype=dt, leaf_size=16, policy=policy, dense_fallback=False)
              for dt in (torch.float32, torch.float16, torch.bfloat16)}
    for dt, cache in caches.items():
        cache.prefill(k[:, :, :prompt].to(dt), v[:, :, :prompt].to(dt))
    for t in range(prompt, prompt + steps):
        q = torch.randn(B, Hkv * G, 1, D, generator=g).to(torch.bfloat16).float()
        got = {dt: cache.decode(q.to(dt), k[:, :, t:t + 1].to(dt), v[:, :, t:t + 1].to(dt))[1]
               for dt, cache in caches.items()}
        want = got[torch.float32]
        for dt in (torch.float16, torch.bfloat16):
            for a, b in zip(got[dt].selection, want.selection):
                assert torch.equal(a, b), (dt, t)
    assert {cache.tree_builds for cache in caches.values()} == {2}


@pytest.mark.parametrize("policy", [hsr.TopK(20), hsr.Softmax(threshold="paper"), hsr.Softmax(threshold=1.0)])
def test_fixed_rules_report_valid_certificates_over_many_steps(policy):
    B, Hkv, G, D, prompt, steps = 2, 2, 3, 64, 100, 40
    k, v, g = stream("clustered", B, Hkv, prompt + steps, D)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=16, policy=policy, dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, prompt + steps):
        q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        err = (out.double() - ref).norm(dim=-1)[..., 0]
        assert (err <= info.error_bound + 1e-5).all()
        tv = left_out_mass(q, k[:, :, :t + 1], info.selection, cache.indexed_length)
        assert (tv <= info.mass_bound * (1 + 1e-9) + 1e-300).all()
        if isinstance(policy, hsr.TopK):
            assert (info.keys_attended == 20 + cache.length - cache.indexed_length).all()


@pytest.mark.parametrize("select", ["auto", "tree+sketch", "sketch", "index"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_relu_equals_dense_relu_over_many_steps(kind, normalize, select):
    # Random keys: no node bound prunes at this bias, and the tree+sketch walk gives up for a
    # scan of every key's sketch.
    B, Hkv, G, D, prompt, steps = 1, 2, 4, 64, 70, 30
    k, v, g = stream(kind, B, Hkv, prompt + steps, D, seed=1)
    policy = hsr.ReLU(alpha=2, bias=1.0, normalize=normalize, select=select)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=8, policy=policy, dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, prompt + steps):
        q = torch.randn(B, Hkv * G, 1, D, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1], kind="relu", alpha=2, bias=1.0,
                               normalize=normalize)
        assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
        assert (info.mass_bound == 0).all() and (info.error_bound == 0).all()
        assert info.select in (("tree+sketch", "sketch") if select == "auto" else (select,))
        # The counts and the selection (arrival positions) agree, and every indexed key with a
        # positive weight is in its head's selection; the tail is counted for every head.
        offsets, ids, mask = info.selection
        tail, n_idx = cache.length - cache.indexed_length, cache.indexed_length
        for h in range(Hkv):
            rows = slice(int(offsets[h]), int(offsets[h + 1]))
            assert info.keys_read[0, h] == rows.stop - rows.start + tail
            for gi in range(G):
                chosen = set(ids[rows][mask[rows, gi]].tolist())
                assert info.keys_attended[0, h * G + gi] == len(chosen) + tail
                scores = (k[0, h, :n_idx].double() @ q[0, h * G + gi, 0].double()) * cache.scale
                assert set((scores > 1.0 + 1e-6).nonzero().flatten().tolist()) <= chosen


@pytest.mark.parametrize("select", ["tree+sketch", "sketch", "tree"])
@pytest.mark.parametrize("prompt", [0, 1])
def test_decode_after_a_tiny_prefill(prompt, select):
    k, v, g = stream("random", 1, 1, 20, 32)
    cache = hsr.HSRKVCache(1, 1, 32, leaf_size=4, policy=hsr.Softmax(eps=1e-3, select=select),
                           dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, 20):
        q = torch.randn(1, 2, 1, 32, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
    assert cache.indexed_length == 20


def test_eps_zero_is_dense_attention_and_bf16_works():
    k, v, g = stream("random", 1, 2, 100, 64, seed=2)
    q = torch.randn(1, 4, 1, 64, generator=g)
    exact = hsr.HSRKVCache(1, 2, 64, leaf_size=16, policy=hsr.Softmax(eps=0.0), dense_fallback=False)
    exact.prefill(k[:, :, :99], v[:, :, :99])
    out, info = exact.decode(q, k[:, :, 99:], v[:, :, 99:])
    torch.testing.assert_close(out, hsr.attention(q, k, v), atol=1e-6, rtol=1e-6)
    assert (info.mass_bound == 0).all() and (info.keys_attended == 100).all()
    kb, vb, qb = k.to(torch.bfloat16), v.to(torch.bfloat16), q.to(torch.bfloat16)
    cache = hsr.HSRKVCache(1, 2, 64, dtype=torch.bfloat16, leaf_size=16, policy=hsr.Softmax(eps=1e-3),
                           dense_fallback=False)
    cache.prefill(kb[:, :, :99], vb[:, :, :99])
    out, info = cache.decode(qb, kb[:, :, 99:], vb[:, :, 99:])
    ref, _ = attention_ref(qb, kb, vb)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 2e-2).all()


def test_bad_input_raises_and_leaves_the_cache_unchanged():
    k, v, g = stream("random", 1, 2, 40, 32)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8)
    cache.prefill(k[:, :, :30], v[:, :, :30])
    q = torch.randn(1, 4, 1, 32, generator=g)
    bad = [
        (q[:, :3], k[:, :, 30:31], v[:, :, 30:31], "multiple"),
        (q.double(), k[:, :, 30:31], v[:, :, 30:31], "q must be"),
        (q, k[:, :, 30:32], v[:, :, 30:32], "k must be"),
        (q, k[:, :1, 30:31], v[:, :1, 30:31], "k must be"),
        (q, k[:, :, 30:31].to(torch.float16), v[:, :, 30:31], "k must be a CPU"),
        (q, k[:, :, 30:31] * float("nan"), v[:, :, 30:31], "NaN"),
        (q, k[:, :, 30:31], v[:, :, 30:31].index_fill(3, torch.tensor([31]), float("-inf")), "k or v contains NaN"),
        (q[:, :, :, :16], k[:, :, 30:31], v[:, :, 30:31], "q must be"),
    ]
    for qq, kk, vv, message in bad:
        with pytest.raises(ValueError, match=message):
            cache.decode(qq, kk, vv)
        assert cache.length == 30 and cache.indexed_length == 24
    with pytest.raises(ValueError, match="not empty"):
        cache.prefill(k[:, :, :5], v[:, :, :5])
    out, info = cache.decode(q, k[:, :, 30:31], v[:, :, 30:31])
    ref, _ = attention_ref(q, k[:, :, :31], v[:, :, :31])
    assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
    cache.reset()
    assert cache.length == 0
    cache.prefill(k[:, :, :3], v[:, :, :3])
    assert cache.length == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_finds_one_bad_element_anywhere(dtype):
    x = torch.randn(3, 5, 97).to(dtype)
    torch.ops.hsr.check_finite([x, x[:, ::2].transpose(0, 2), x[:0]], "here", "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in ((0, 0, 0), (2, 4, 96), (1, 3, 50)):
            y = x.clone()
            y[at] = bad
            with pytest.raises(ValueError, match="here: y contains NaN or Inf"):
                torch.ops.hsr.check_finite([x, y], "here", "y")
    with pytest.raises(ValueError, match="must be float32"):
        torch.ops.hsr.check_finite([torch.zeros(3, dtype=torch.int64)], "here", "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_reads_row_slices_in_place(dtype):
    # A decode step's k[:, :, i:i+1] (rows contiguous, the tensor not): only its own rows count.
    x = torch.randn(2, 3, 7, 5).to(dtype)
    x[1, 2, 4, 0] = float("nan")
    x[0, 0, 2, 4] = float("inf")
    for i in (0, 1, 3, 5, 6):
        torch.ops.hsr.check_finite([x[:, :, i:i + 1], x[:, :, i:i + 1].transpose(0, 1)], "here", "k")
    for i, bad in ((2, "inf"), (4, "nan")):
        with pytest.raises(ValueError, match="here: k contains NaN or Inf"):
            torch.ops.hsr.check_finite([x[:, :, i:i + 1]], "here", "k")
    torch.ops.hsr.check_finite([x[:, :, 5:], x[..., 1:4][:, :, :2]], "here", "k")  # spans of rows, strided rows
    with pytest.raises(ValueError, match="here: k contains NaN or Inf"):
        torch.ops.hsr.check_finite([x[..., :1]], "here", "k")  # strided rows: copied, then checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_write_tokens_copies_rows_and_rejects_what_does_not_fit(dtype):
    bufs = [torch.zeros(2, 3, 10, 5).to(dtype), torch.zeros(2, 3, 10, 7).to(dtype)]
    a = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5).to(dtype)
    b = torch.arange(2 * 3 * 7 * 4).view(2, 3, 7, 4).transpose(2, 3).to(dtype)  # rows not contiguous
    torch.ops.hsr.write_tokens(bufs, [a, b], 6, "here", ["a", "b"])
    assert torch.equal(bufs[0][:, :, 6:], a) and torch.equal(bufs[1][:, :, 6:], b)
    assert not bufs[0][:, :, :6].any() and not bufs[1][:, :, :6].any()
    before = [t.clone() for t in bufs]
    other = torch.float64 if dtype != torch.float64 else torch.float32
    for tokens, start, names, length, message in [
            ([a, b], 7, ["a", "b"], -1, r"here: rows \[7, 11\) are outside the buffer's 10"),
            ([a, b], -1, ["a", "b"], -1, "outside"),
            ([a], 0, ["a", "b"], -1, "one token tensor per buffer, got 1 for 2"),
            ([a, b], 0, ["a"], -1, "one name per buffer"),
            ([a, b[..., :3]], 0, ["a", "b"], -1, r"here: b must be \(2, 3, L, 7\), got \(2, 3, 4, 3\)"),
            ([a, b[:1]], 0, [], -1, r"here: tokens\[1\] must be \(2, 3, L, 7\), got \(1, 3, 4, 7\)"),
            ([a[0], b], 0, ["a", "b"], -1, r"a must be \(2, 3, L, 5\), got \(3, 4, 5\)"),
            ([a, b], 0, ["a", "b"], 3, r"a must be \(2, 3, 3, 5\), got \(2, 3, 4, 5\)"),
            ([a.to(other), b], 0, ["a", "b"], -1, f"here: a must be a CPU {dtype} tensor, got {other} on cpu"),
            ([a, b[:, :, :3]], 0, ["a", "b"], -1, "here: a and b must hold the same number of tokens")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.hsr.write_tokens(bufs, tokens, start, "here", names, length)
        assert all(torch.equal(x, y) for x, y in zip(bufs, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_tokens_copies_rows_with_gaps_and_large_blocks(dtype):
    # Rows with gaps between them on either side are copied one by one; rows without gaps as
    # one block per (batch, head), in parallel threads when the blocks are large.
    wide = torch.arange(2 * 3 * 4 * 9).view(2, 3, 4, 9).to(dtype)
    bufs = [torch.zeros(2, 3, 10, 5, dtype=dtype), torch.zeros(2, 3, 10, 8, dtype=dtype)[..., :6]]
    torch.ops.hsr.write_tokens(bufs, [wide[..., 2:7], wide[..., :6]], 3, "here", ["a", "b"])
    assert torch.equal(bufs[0][:, :, 3:7], wide[..., 2:7]) and torch.equal(bufs[1][:, :, 3:7], wide[..., :6])
    assert not bufs[0][:, :, 7:].any() and not bufs[1]._base[..., 6:].any()
    big = torch.randn(2, 3, 70_000, 8).to(dtype)  # 2 MB per (batch, head)
    buf = [torch.zeros(2, 3, 70_010, 8, dtype=dtype)]
    torch.ops.hsr.write_tokens(buf, [big], 10, "here", ["k"])
    assert torch.equal(buf[0][:, :, 10:], big) and not buf[0][:, :, :10].any()


def test_permute_rows_reorders_every_buffer_per_batch_and_head():
    g = torch.Generator().manual_seed(5)
    B, H, n, cap = 2, 3, 97, 130
    bufs = [torch.randn(B, H, cap, 5, generator=g).bfloat16(), torch.randint(0, 255, (B, H, cap, 64), generator=g,
            dtype=torch.uint8), torch.randn(B, H, cap, 1, generator=g), torch.arange(B * H * cap).view(B, H, cap, 1)]
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H)]).view(B, H, n)
    want = [b.clone() for b in bufs]
    for w in want:
        for bi in range(B):
            for h in range(H):
                w[bi, h, :n] = w[bi, h, :n].index_select(0, perm[bi, h])
    torch.ops.hsr.permute_rows(bufs, perm)
    assert all(torch.equal(b, w) for b, w in zip(bufs, want))
    before = [b.clone() for b in bufs]
    repeated = perm.clone()
    repeated[1, 2, 5] = repeated[1, 2, 6]
    for bad, message in [(repeated, "perm must hold a permutation of 0..96"), (perm + 1, "permutation"),
                         (perm.int(), "perm must be a CPU int64 tensor"), (perm[0], "perm must be a CPU int64"),
                         (torch.zeros(B, H, cap + 1, dtype=torch.long), "buffers must be CPU")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.hsr.permute_rows(bufs, bad)
        assert all(torch.equal(b, w) for b, w in zip(bufs, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_norm_bounds_are_upper_bounds_within_a_float_step(dtype):
    from fractions import Fraction
    g = torch.Generator().manual_seed(2)
    cases = [torch.randn(1, 2, 97, 128, generator=g), torch.randn(3, 1025, 97, generator=g) * 1e-3,
             torch.randn(5, 1, generator=g), torch.zeros(2, 3, 4, 7), torch.randn(7, generator=g)]
    if dtype == torch.float32:
        cases += [torch.randn(4, 33, generator=g) * 1e30, torch.full((2, 3), 3e38)]
    for x in cases:
        x = x.to(dtype)
        up = hsr.certified.value_norm_bounds(x)
        assert up.dtype == torch.float32 and up.shape == x.shape[:-1]
        exact = x.double().norm(dim=-1)
        assert (up.double() >= exact * (1 - 1e-15)).all()
        finite = exact < 3.4e38
        assert (up.double()[finite] <= exact[finite] * (1 + 2 ** -22)).all()
        assert torch.isinf(up[~finite]).all()
        for row, bound in list(zip(x.reshape(-1, x.shape[-1]), up.flatten()))[:40]:  # exactly
            assert math.isinf(bound) or Fraction(float(bound)) ** 2 >= sum(Fraction(float(v)) ** 2 for v in row.tolist())
    # A cache reads its buffers through narrowed views, and transposed rows are copied first.
    buf = torch.randn(2, 3, 50, 16, generator=g).to(dtype)
    assert torch.equal(hsr.certified.value_norm_bounds(buf[:, :, 10:30]), hsr.certified.value_norm_bounds(
        buf[:, :, 10:30].contiguous()))
    t = buf.transpose(2, 3)
    assert torch.equal(hsr.certified.value_norm_bounds(t), hsr.certified.value_norm_bounds(t.contiguous()))
    assert hsr.certified.value_norm_bounds(torch.zeros(2, 0, 5, dtype=dtype)).shape == (2, 0)
    assert torch.equal(hsr.certified.value_norm_bounds(torch.zeros(3, 0, dtype=dtype)), torch.zeros(3))
    assert torch.equal(hsr.certified.value_norm_bounds(torch.zeros(0, dtype=dtype)), torch.tensor(0.0))
    with pytest.raises(ValueError, match="hsr.row_norm_bounds: x must be float32, float16 or bfloat16"):
        torch.ops.hsr.row_norm_bounds(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="v must be a CPU tensor"):
        hsr.certified.value_norm_bounds("not a tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_moments_sum_each_channel_in_float64(dtype):
    g = torch.Generator().manual_seed(3)
    buf = (torch.randn(2, 3, 1025, 97, generator=g) * 4 + 1).to(dtype)
    for x in (buf, buf[:, :, 100:1001], buf[:, :, :0], buf.transpose(2, 3)[..., :5].transpose(2, 3)):
        s, sq = torch.ops.hsr.token_moments(x)
        assert s.dtype == sq.dtype == torch.float64 and s.shape == (2, 3, 97)
        torch.testing.assert_close(s, x.double().sum(2), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(sq, (x.double() ** 2).sum(2), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="must be a 4-D CPU tensor"):
        torch.ops.hsr.token_moments(buf[0])
    with pytest.raises(ValueError, match="must be float32, float16 or bfloat16"):
        torch.ops.hsr.token_moments(torch.ones(1, 1, 2, 3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_tokens_checks_what_write_tokens_checks_and_finiteness(dtype):
    bufs = [torch.zeros(1, 2, 4, 3, dtype=dtype), torch.zeros(1, 2, 4, 5, dtype=dtype)]
    k, v = torch.ones(1, 2, 9, 3, dtype=dtype), torch.ones(1, 2, 9, 5, dtype=dtype)
    torch.ops.hsr.check_tokens(bufs, [k, v], "here", ["k", "v"], 9, True)  # larger than the buffers: no write
    with pytest.raises(ValueError, match=r"here: v must be \(1, 2, 8, 5\)"):
        torch.ops.hsr.check_tokens(bufs, [k[:, :, :8], v], "here", ["k", "v"], 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        late = v.clone()
        late[0, 1, 8, 4] = bad  # the last element
        torch.ops.hsr.check_tokens(bufs, [k, late], "here", ["k", "v"])  # finite not asked
        with pytest.raises(ValueError, match="here: k or v contains NaN or Inf"):
            torch.ops.hsr.check_tokens(bufs, [k, late], "here", ["k", "v"], -1, True)
        with pytest.raises(ValueError, match="here: k or v contains NaN or Inf"):
            torch.ops.hsr.write_tokens(bufs, [k[:, :, :1], late[:, :, 8:]], 0,
                                       "here", ["k", "v"], 1, True)
        assert not any(b.any() for b in bufs)


def test_bad_construction_and_policies():
    with pytest.raises(ValueError, match="eps"):
        hsr.Softmax(eps=1.0)
    with pytest.raises(ValueError, match="alpha"):
        hsr.ReLU(alpha=0)
    with pytest.raises(ValueError, match="bias"):
        hsr.ReLU(bias=math.inf)
    with pytest.raises(ValueError, match="select"):
        hsr.ReLU(select="tree")
    with pytest.raises(ValueError, match="select"):
        hsr.Softmax(select="index")
    with pytest.raises(ValueError, match="threshold"):
        hsr.Softmax(threshold="median")
    with pytest.raises(ValueError, match="threshold"):
        hsr.Softmax(threshold=math.inf)
    with pytest.raises(ValueError, match="k must be"):
        hsr.TopK(0)
    with pytest.raises(ValueError, match="head_dim"):
        hsr.HSRKVCache(1, 1, 0)
    with pytest.raises(ValueError, match="dtype"):
        hsr.HSRKVCache(1, 1, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="cpu"):
        hsr.HSRKVCache(1, 1, 32, device="cuda")
    with pytest.raises(ValueError, match="sketch"):
        hsr.HSRKVCache(1, 1, 32, sketch="int2")
    with pytest.raises(ValueError, match="probe_every"):
        hsr.HSRKVCache(1, 1, 32, probe_every=0)
    for bad in (0, -0.5, math.nan, math.inf, True, "0.25"):
        with pytest.raises(ValueError, match="rebuild_after"):
            hsr.HSRKVCache(1, 1, 32, rebuild_after=bad)
    with pytest.raises(ValueError, match="policy"):
        hsr.HSRKVCache(1, 1, 32, policy="softmax")


def delayed(f, seconds=0.05):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return f(*args, **kwargs)
    return slow


@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-3), hsr.ReLU(alpha=2, bias=0.1)])
def test_dense_fallback_times_both_paths_and_stays_exact_or_certified(policy, monkeypatch):
    k, v, g = stream("random", 1, 2, 300, 32, seed=3)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=policy, probe_every=4)
    cache.prefill(k[:, :, :200], v[:, :, :200])
    sparse, dense = cache._attend, cache._attend_dense
    kind = dict(kind="softmax") if isinstance(policy, hsr.Softmax) else \
        dict(kind="relu", alpha=policy.alpha, bias=policy.bias)
    paths = []
    for t in range(200, 216):
        # The dense path is made the slower one for the first 8 steps, the sparse one after.
        monkeypatch.setattr(cache, "_attend_dense", delayed(dense) if t < 208 else dense)
        monkeypatch.setattr(cache, "_attend", sparse if t < 208 else delayed(sparse))
        q = torch.randn(1, 4, 1, 32, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        paths.append(info.path)
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1], **kind)
        err = (out.double() - ref).norm(dim=-1)[..., 0]
        assert (err <= info.error_bound + 1e-5).all()
        if info.path == "dense":
            assert info.selection is None and (info.mass_bound == 0).all() and (info.keys_read == t + 1).all()
    # Probes at steps 0, 4, 8 and 12: the sparse path wins the first two, the dense one the rest.
    assert paths == ["sparse"] * 8 + ["dense"] * 8


TIMED_POLICIES = [hsr.Softmax(eps=1e-2, select="tree+sketch"), hsr.Softmax(eps=1e-2, select="sketch"),
                  hsr.Softmax(eps=1e-2, select="tree"), hsr.Softmax(eps=0.1, estimate=True), hsr.TopK(8),
                  hsr.Softmax(threshold=1.0), hsr.ReLU(bias=0.1, select="tree+sketch"),
                  hsr.ReLU(bias=0.1, select="sketch"), hsr.ReLU(bias=0.1, select="index")]


@pytest.mark.parametrize("policy", TIMED_POLICIES, ids=repr)
def test_step_time_is_split_into_selecting_and_attending(policy):
    k, v, g = stream("clustered", 1, 2, 260, 32, seed=5)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=policy, dense_fallback=False)
    cache.prefill(k[:, :, :200], v[:, :, :200])
    for t in range(200, 212):
        out, info = cache.decode(torch.randn(1, 4, 1, 32, generator=g), k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert info.path == "sparse" and info.select_seconds > 0 and info.attend_seconds > 0
        assert info.select_seconds + info.attend_seconds <= info.seconds


def test_a_dense_step_spends_no_time_selecting(monkeypatch):
    k, v, g = stream("random", 1, 2, 120, 32, seed=6)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=hsr.Softmax(eps=1e-3))
    cache.prefill(k[:, :, :100], v[:, :, :100])
    monkeypatch.setattr(cache, "_attend", delayed(cache._attend))  # the probe keeps the dense path
    out, info = cache.decode(torch.randn(1, 4, 1, 32, generator=g), k[:, :, 100:101], v[:, :, 100:101])
    assert info.path == "dense" and info.select_seconds == 0.0 and 0 < info.attend_seconds <= info.seconds


def keep_dense(cache, monkeypatch):
    """Makes the next probe keep the dense path (the sparse one is slowed down)."""
    monkeypatch.setattr(cache, "_attend", delayed(cache._attend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-3), hsr.ReLU(alpha=2, bias=0.05, normalize=False)], ids=repr)
def test_kept_dense_steps_append_and_read_every_key(policy, dtype, monkeypatch):
    # After a probe keeps the dense path, a step appends and reads in one call: through tails
    # that fill (and are indexed), buffers that grow and later probes, every step equals
    # hsr.attention over the stored keys bit for bit, reports every key read and stores the
    # key in arrival order.
    B, Hkv, G, D, leaf = 2, 3, 3, 97, 8
    k, v, g = stream("random", B, Hkv, 300, D, seed=11)
    k, v = k.to(dtype), v.to(dtype)
    cache = hsr.HSRKVCache(B, Hkv, D, dtype=dtype, leaf_size=leaf, policy=policy, probe_every=50)
    cache.prefill(k[:, :, :100], v[:, :, :100])
    keep_dense(cache, monkeypatch)
    kind = dict(kind="softmax") if isinstance(policy, hsr.Softmax) else \
        dict(kind="relu", alpha=policy.alpha, bias=policy.bias, normalize=policy.normalize)
    for t in range(100, 300):
        q = torch.randn(B, Hkv * G, 1, D, generator=g).to(dtype)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert info.path == "dense" and info.selection is None and info.select is None
        assert torch.equal(out, hsr.attention(q, cache.stored_keys, cache.stored_values, **kind))
        assert (info.mass_bound == 0).all() and (info.error_bound == 0).all()
        assert info.mass_bound.dtype == torch.float64 and tuple(info.mass_bound.shape) == (B, Hkv * G)
        assert (info.keys_attended == t + 1).all() and tuple(info.keys_attended.shape) == (B, Hkv * G)
        assert (info.keys_read == t + 1).all() and tuple(info.keys_read.shape) == (B, Hkv)
        assert info.bytes_read == B * Hkv * (t + 1) * 2 * D * k.element_size()
        assert info.select_seconds == 0.0 and 0 < info.attend_seconds <= info.seconds
        assert cache.length == t + 1 and cache.indexed_length == (t + 1) // leaf * leaf
    assert torch.equal(cache.keys, k) and torch.equal(cache.values, v)
    ref, _ = attention_ref(q, k, v, **kind)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_a_kept_dense_step_rejects_bad_input_and_changes_nothing(monkeypatch):
    # The same checks and messages as any step, also when the buffers are full (a step that
    # grows them checks before it grows).
    k, v, g = stream("random", 1, 2, 140, 32, seed=12)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=64)
    cache.prefill(k[:, :, :100], v[:, :, :100])
    keep_dense(cache, monkeypatch)
    q = torch.randn(1, 4, 1, 32, generator=g)
    cache.decode(q, k[:, :, 100:101], v[:, :, 100:101])
    bad = [
        (q[:, :3], k[:, :, 0:1], v[:, :, 0:1], r"q must be \(1, Hq, 1, 32\) with Hq a multiple of 2, got \(1, 3, 1, 32\)"),
        (q.double(), k[:, :, 0:1], v[:, :, 0:1], "q must be a CPU torch.float32 tensor, got torch.float64 on cpu"),
        (q[:, :, :, :16], k[:, :, 0:1], v[:, :, 0:1], "q must be"),
        (q.expand(1, 4, 2, 32), k[:, :, 0:1], v[:, :, 0:1], "q must be"),
        ("q", k[:, :, 0:1], v[:, :, 0:1], "q must be"),
        (q, k[:, :, 0:2], v[:, :, 0:2], "k must be"),
        (q, k[:, :1, 0:1], v[:, :1, 0:1], "k must be"),
        (q, k[:, :, 0:1].to(torch.float16), v[:, :, 0:1], "k must be a CPU"),
        (q, k[:, :, 0:1] * float("nan"), v[:, :, 0:1], "NaN"),
        (q, k[:, :, 0:1], v[:, :, 0:1].index_fill(3, torch.tensor([31]), float("-inf")), "k or v contains NaN"),
        (q, None, v[:, :, 0:1], "k must be a tensor, got NoneType"),
        (q, k[:, :, 0:1], [1.0], "v must be a tensor, got list"),
    ]
    for t in range(101, 140):
        if t in (105, 112):  # 112: the buffers (room for 112 keys after the prefill) are full
            for qq, kk, vv, message in bad:
                assert cache._dense_step_kept()
                with pytest.raises(ValueError, match=message):
                    cache.decode(qq, kk, vv)
                assert cache.length == t and torch.equal(cache.keys, k[:, :, :t])
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert info.path == "dense"
    ref, _ = attention_ref(q, k, v)
    assert (out.double() - ref).abs().max() <= 1e-5


def test_decode_dense_step_op_checks_before_it_writes():
    # The op under HSRKVCache's dense steps: one token per buffer at row `start`, then every
    # row up to it read; bad input raises and writes nothing.
    g = torch.Generator().manual_seed(13)
    bufs = [torch.randn(2, 3, 16, 24, generator=g), torch.randn(2, 3, 16, 40, generator=g)]
    k_new, v_new = torch.randn(2, 3, 1, 24, generator=g), torch.randn(2, 3, 1, 40, generator=g)
    q = torch.randn(2, 6, 1, 24, generator=g)
    step = torch.ops.hsr.decode_dense_step
    before = [b.clone() for b in bufs]
    for args, message in [
        ((bufs, [k_new, v_new], 16), r"rows \[16, 17\) are outside"),
        ((bufs, [k_new, v_new], -1), "at least one row"),
        ((bufs[:1], [k_new], 3), "a key and a value buffer"),
        ((bufs, [k_new[:, :, :0], v_new[:, :, :0]], 0), "at least one row"),
        ((bufs, [k_new.expand(2, 3, 2, 24), v_new], 3), "k must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            step(*args, "W", ["k", "v"], True, q)
    with pytest.raises(ValueError, match=r"W: q must be \(2, Hq, 1, 24\)"):
        step(bufs, [k_new, v_new], 3, "W", ["k", "v"], True, q.expand(2, 6, 2, 24))
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))
    out, mass, err, attended, read = step(bufs, [k_new, v_new], 3, "W", ["k", "v"], True, q, "relu", 0.5, 2, 0.1,
                                          False)
    assert torch.equal(bufs[0][:, :, 3:4], k_new) and torch.equal(bufs[1][:, :, 3:4], v_new)
    assert torch.equal(bufs[0][:, :, 4:], before[0][:, :, 4:])
    assert torch.equal(out, hsr.attention(q, bufs[0][:, :, :4], bufs[1][:, :, :4], kind="relu", scale=0.5, alpha=2,
                                          bias=0.1, normalize=False))
    assert torch.equal(mass, torch.zeros(2, 6, dtype=torch.float64)) and torch.equal(err, mass)
    assert torch.equal(attended, torch.full((2, 6), 4)) and torch.equal(read, torch.full((2, 3), 4))
    torch.library.opcheck(step.default, (bufs, [k_new, v_new], 3, "W", ["k", "v"], True, q))


@pytest.mark.parametrize("slow", ["select", "attend"])
@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-2, estimate=True), hsr.TopK(8),
                                    hsr.ReLU(bias=0.1, select="sketch")], ids=repr)
def test_a_slow_selection_or_kernel_shows_in_its_own_time(policy, slow, monkeypatch):
    # The paths whose selection and kernel are separate calls from Python (the certified
    # steps time their selection inside one call: test_certified_steps_time_their_parts).
    import hsr.certified
    import hsr.kvcache

    if slow == "attend":
        target = hsr.kvcache if isinstance(policy, hsr.ReLU) else hsr.certified
        monkeypatch.setattr(target, "sparse_attention", delayed(target.sparse_attention))
    k, v, g = stream("clustered", 1, 2, 260, 32, seed=7)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=policy, dense_fallback=False)
    cache.prefill(k[:, :, :200], v[:, :, :200])
    if slow == "select":
        if isinstance(policy, hsr.ReLU):
            monkeypatch.setattr(hsr.kvcache, "relu_sketch_select", delayed(hsr.kvcache.relu_sketch_select))
        elif isinstance(policy, hsr.TopK):
            monkeypatch.setattr(cache._index, "search", delayed(cache._index.search))
        else:
            monkeypatch.setattr(torch.ops.hsr, "sketch_select_estimate", delayed(torch.ops.hsr.sketch_select_estimate))
    out, info = cache.decode(torch.randn(1, 4, 1, 32, generator=g), k[:, :, 200:201], v[:, :, 200:201])
    slow_part, fast_part = (info.select_seconds, info.attend_seconds) if slow == "select" else \
        (info.attend_seconds, info.select_seconds)
    assert slow_part >= 0.05 > fast_part


def test_the_probe_runs_every_path_twice_in_mirrored_order_and_keeps_the_least_total(monkeypatch):
    # The first path run pays a cold start (0.06 s once), the second is steadily slow (0.04 s
    # a run): timed once each, the second would look faster; over both runs the first is.
    k, v, g = stream("clustered", 1, 2, 300, 32, seed=8)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=hsr.Softmax(eps=1e-2))
    cache.prefill(k[:, :, :200], v[:, :, :200])
    sparse, dense = cache._attend, cache._attend_dense
    calls = []

    def timed_sparse(q, select=None):
        calls.append(select)
        time.sleep(0.06 if calls.count("tree+sketch") == 1 and select == "tree+sketch" else
                   0.04 if select == "sketch" else 0.0)
        return sparse(q, select)

    def timed_dense(q):
        calls.append("dense")
        time.sleep(0.1)
        return dense(q)

    monkeypatch.setattr(cache, "_attend", timed_sparse)
    monkeypatch.setattr(cache, "_attend_dense", timed_dense)
    q = torch.randn(1, 4, 1, 32, generator=g)
    out, info = cache.decode(q, k[:, :, 200:201], v[:, :, 200:201])
    assert calls == ["tree+sketch", "sketch", "dense", "dense", "sketch", "tree+sketch"]
    assert info.path == "sparse" and info.select == "tree+sketch"
    ref, _ = attention_ref(q, k[:, :, :201], v[:, :, :201])
    assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
    calls.clear()  # until the next probe, the kept path alone
    cache.decode(q, k[:, :, 201:202], v[:, :, 201:202])
    assert calls == ["tree+sketch"]


def test_auto_selection_keeps_the_faster_of_tree_and_sketch(monkeypatch):
    k, v, g = stream("clustered", 1, 2, 300, 32, seed=4)
    cache = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=hsr.Softmax(eps=1e-2), dense_fallback=False, probe_every=4)
    cache.prefill(k[:, :, :200], v[:, :, :200])
    attend = cache._attend
    slow = {"tree+sketch"}

    def timed(q, select=None):
        if select in slow:
            time.sleep(0.05)
        return attend(q, select)

    monkeypatch.setattr(cache, "_attend", timed)
    selects = []
    for t in range(200, 216):
        if t == 208:
            slow.clear()
            slow.add("sketch")
        q = torch.randn(1, 4, 1, 32, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        selects.append(info.select)
        assert info.path == "sparse"
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        err = (out.double() - ref).norm(dim=-1)[..., 0]
        assert (err <= info.error_bound + 1e-5).all() and (info.mass_bound <= 1e-2).all()
    # Probes at steps 0, 4, 8, 12: the sketch wins the first two, the tree walk the rest.
    assert selects == ["sketch"] * 8 + ["tree+sketch"] * 8
    # An explicit selection is used as given, and reported.
    fixed = hsr.HSRKVCache(1, 2, 32, leaf_size=8, policy=hsr.Softmax(eps=1e-2, select="tree"), dense_fallback=False)
    fixed.prefill(k[:, :, :200], v[:, :, :200])
    _, info = fixed.decode(torch.randn(1, 4, 1, 32, generator=g), k[:, :, 200:201], v[:, :, 200:201])
    assert info.select == "tree" and info.path == "sparse"


def test_buffers_leave_room_after_the_first_fill():
    from hsr.buffers import KVCache

    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, 2, 8)
    k = torch.randn(1, 2, 800, 8, generator=g)
    cache.append(k, k)
    held = cache.keys.data_ptr()
    for t in range(100):  # within the eighth of headroom: no copy
        cache.append(k[:, :, t:t + 1], k[:, :, t:t + 1])
        assert cache.keys.data_ptr() == held
    cache.append(k, k)  # past it: the buffers grow, and keep what they held
    assert cache.keys.data_ptr() != held and cache.length == 1700
    assert torch.equal(cache.keys[:, :, :800], k) and torch.equal(cache.keys[:, :, 900:], k)
    assert torch.equal(cache.values[:, :, 800:900], k[:, :, :100])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_mode_over_many_steps_with_flushes(dtype):
    B, Hkv, G, D, prompt, steps, eps = 2, 2, 3, 64, 90, 40, 0.2
    k, v, g = stream("clustered", B, Hkv, prompt + steps, D)
    k, v = k.to(dtype), v.to(dtype)
    policy = hsr.Softmax(eps=eps, estimate=True)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=16, policy=policy, dtype=dtype, dense_fallback=False)
    plain = hsr.HSRKVCache(B, Hkv, D, leaf_size=16, policy=hsr.Softmax(eps=eps, select="sketch"), dtype=dtype,
                           dense_fallback=False)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    plain.prefill(k[:, :, :prompt], v[:, :, :prompt])
    errs, plain_errs = [], []
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for t in range(prompt, prompt + steps):
        q = (torch.randn(B, Hkv * G, 1, D, generator=g) * 2).to(dtype)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        out_p, info_p = plain.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert info.select == "sketch" and torch.equal(info.mass_bound, info_p.mass_bound)
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        err = (out.double() - ref).norm(dim=-1)[..., 0]
        assert (info.mass_bound <= eps).all() and (err <= info.error_bound + tol).all()
        errs.append(err.mean())
        plain_errs.append((out_p.double() - ref).norm(dim=-1).mean())
    assert torch.stack(errs).mean() < torch.stack(plain_errs).mean()


def test_estimate_policy_validation():
    with pytest.raises(ValueError, match="estimate"):
        hsr.Softmax(estimate=1)
    with pytest.raises(ValueError, match="estimate=True"):
        hsr.Softmax(estimate=True, select="tree+sketch")
    with pytest.raises(ValueError, match="estimate=True"):
        hsr.Softmax(estimate=True, threshold=1.0)


@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-3, select="tree"), hsr.TopK(16),
                                    hsr.Softmax(eps=0.2, estimate=True)])
def test_indexed_keys_are_stored_leaf_contiguous_and_read_back_in_arrival_order(policy):
    B, Hkv, G, D, leaf = 2, 2, 2, 24, 8
    k, v, g = stream("clustered", B, Hkv, 300, D, seed=4)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=leaf, policy=policy, dense_fallback=False)
    cache.extend(k[:, :, :5], v[:, :, :5])          # no whole leaf yet: nothing indexed or moved
    assert cache.indexed_length == 0 and cache.stored_keys.data_ptr() == cache.keys.data_ptr()
    cache.extend(k[:, :, 5:30], v[:, :, 5:30])      # builds the trees: rows move into leaf order
    cache.extend(k[:, :, 30:150], v[:, :, 30:150])  # more than is indexed: rebuilt over the moved rows
    cache.extend(k[:, :, 150:170], v[:, :, 150:170])  # whole leaves added: rows stay in place
    t = 170
    for t in range(170, 230):
        q = torch.randn(B, Hkv * G, 1, D, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
        tv = left_out_mass(q, k[:, :, :t + 1], info.selection, cache.indexed_length)
        assert (tv <= info.mass_bound * (1 + 1e-9) + 1e-300).all()
    n = t + 1
    pos = cache.positions
    assert pos.shape == (B, Hkv, n) and torch.equal(pos.sort(-1).values, torch.arange(n).expand(B, Hkv, -1))
    assert not torch.equal(pos[..., :cache.indexed_length], torch.arange(cache.indexed_length).expand(B, Hkv, -1))
    assert torch.equal(pos[..., cache.indexed_length:], torch.arange(cache.indexed_length, n).expand(B, Hkv, -1))
    expand = pos.unsqueeze(-1).expand(-1, -1, -1, D)
    assert torch.equal(cache.stored_keys, k[:, :, :n].gather(2, expand))
    assert torch.equal(cache.stored_values, v[:, :, :n].gather(2, expand))
    assert torch.equal(cache.keys, k[:, :, :n]) and torch.equal(cache.values, v[:, :, :n])
    if policy == hsr.Softmax(eps=0.2, estimate=True):  # block means follow the stored rows
        m = cache.indexed_length
        want = cache.stored_values[:, :, :m].float().view(B, Hkv, m // leaf, leaf, D).mean(3)
        torch.testing.assert_close(cache._block_means.views()[0], want)
    if not cache._index.keeps_points:
        return
    # Each tree's ids are storage rows: the top key it reports is that stored row, and the best.
    qs = torch.randn(B, Hkv, D, generator=g)
    top_score, top_id = cache._index.search(qs, 1)
    stored = cache.stored_keys[:, :, :cache.indexed_length].double()
    for b in range(B):
        for h in range(Hkv):
            scores = stored[b, h] @ qs[b, h].double()
            assert abs(float(scores[top_id[b, h, 0]]) - float(top_score[b, h, 0])) < 1e-4
            assert abs(float(scores.max()) - float(top_score[b, h, 0])) < 1e-4


@pytest.mark.parametrize("rebuild_after, builds", [(0.25, [1, 1, 2, 2, 3, 3]), (1.0, [1] * 6), (None, [1] * 6)])
def test_rebuild_after_rebuilds_the_trees_as_decode_adds_leaves_and_stays_exact(rebuild_after, builds):
    # Built over 200 keys at the prefill; with rebuild_after=0.25, again once 50 more are
    # indexed (at 256: leaves of 8 arrive whole), then at 320 (64 more than 256); 1.0 would
    # wait for 400.
    B, Hkv, G, D = 1, 2, 3, 32
    k, v, g = stream("clustered", B, Hkv, 330, D, seed=9)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=8, policy=hsr.ReLU(alpha=2, bias=0.5, select="tree+sketch"),
                           dense_fallback=False, rebuild_after=rebuild_after)
    cache.prefill(k[:, :, :200], v[:, :, :200])
    seen = []
    for t in range(200, 330):
        q = torch.randn(B, Hkv * G, 1, D, generator=g)
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1], kind="relu", alpha=2, bias=0.5)
        assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
        # The selection is in arrival positions whatever the rows' storage order.
        offsets, ids, mask = info.selection
        for h in range(Hkv):
            rows = slice(int(offsets[h]), int(offsets[h + 1]))
            for gi in range(G):
                scores = (k[0, h, :cache.indexed_length].double() @ q[0, h * G + gi, 0].double()) * cache.scale
                assert set((scores > 0.5 + 1e-6).nonzero().flatten().tolist()) <= \
                    set(ids[rows][mask[rows, gi]].tolist())
        if t + 1 in (210, 250, 260, 300, 320, 330):
            seen.append(cache.tree_builds)
    assert seen == builds
    assert torch.equal(cache.keys, k) and torch.equal(cache.values, v)
    # The paper threshold's key statistics count every indexed key once, rebuilds or not.
    n = cache.indexed_length
    torch.testing.assert_close(cache._k_sum, k[:, :, :n].double().sum(2))


def test_caches_whose_steps_read_no_tree_wait_to_rebuild_until_one_will(monkeypatch):
    # The same growth as above (200 -> 330 keys, leaves of 8): a cache that reads by the sketch
    # alone never rebuilds, one whose probe kept the dense read rebuilds only before its next
    # probe (which times the tree walk too).
    B, Hkv, G, D = 1, 2, 3, 32
    k, v, g = stream("clustered", B, Hkv, 330, D, seed=9)
    sketch_only = hsr.HSRKVCache(B, Hkv, D, leaf_size=8, policy=hsr.Softmax(eps=1e-2, select="sketch"),
                                 dense_fallback=False)
    dense_kept = hsr.HSRKVCache(B, Hkv, D, leaf_size=8, policy=hsr.Softmax(eps=1e-2), probe_every=100)
    monkeypatch.setattr(dense_kept, "_attend", delayed(dense_kept._attend))  # the probe keeps the dense read
    for cache in (sketch_only, dense_kept):
        cache.prefill(k[:, :, :200], v[:, :, :200])
    builds = []
    for t in range(200, 330):
        q = torch.randn(B, Hkv * G, 1, D, generator=g)
        for cache in (sketch_only, dense_kept):
            out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
            ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
            assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
        assert dense_kept._path == "dense"
        builds.append((sketch_only.tree_builds, dense_kept.tree_builds))
    assert all(b == 1 for b, _ in builds)
    # dense_kept probes at steps 0 and 100 (length 300): 64 keys were added by then (>= 50).
    assert [d for _, d in builds] == [1] * 100 + [2] * 30


@pytest.mark.parametrize("policy", [hsr.Softmax(eps=1e-2, select="tree+sketch"), hsr.Softmax(eps=0.2, estimate=True),
                                    hsr.TopK(8), hsr.ReLU(bias=0.5, select="index")], ids=repr)
def test_rebuild_regroups_the_added_leaves_and_changes_no_answer(policy):
    # Whole leaves of the stream's next keys added one at a time (never rebuilt), then
    # rebuild(): every row moves into the new leaf order and decoding stays exact/certified.
    B, Hkv, G, D, leaf = 2, 2, 2, 24, 8
    k, v, g = stream("clustered", B, Hkv, 400, D, seed=10)
    cache = hsr.HSRKVCache(B, Hkv, D, leaf_size=leaf, policy=policy, dense_fallback=False, rebuild_after=None)
    cache.prefill(k[:, :, :100], v[:, :, :100])
    for s in range(100, 300, leaf):
        cache.extend(k[:, :, s:s + leaf], v[:, :, s:s + leaf])
    assert cache.tree_builds == 1 and cache.indexed_length == 296
    before = cache.stored_keys.clone()
    cache.rebuild()
    assert cache.tree_builds == 2 and not torch.equal(cache.stored_keys, before)
    assert torch.equal(cache.keys, k[:, :, :300]) and torch.equal(cache.values, v[:, :, :300])
    if policy == hsr.Softmax(eps=0.2, estimate=True):  # block means follow the moved rows
        m = cache.indexed_length
        want = cache.stored_values[:, :, :m].float().view(B, Hkv, m // leaf, leaf, D).mean(3)
        torch.testing.assert_close(cache._block_means.views()[0], want)
    for t in range(300, 312):
        q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
        out, info = cache.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1])
        if isinstance(policy, hsr.ReLU):
            ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1], kind="relu", alpha=2, bias=0.5)
            assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
            continue
        ref, _ = attention_ref(q, k[:, :, :t + 1], v[:, :, :t + 1])
        assert ((out.double() - ref).norm(dim=-1)[..., 0] <= info.error_bound + 1e-5).all()
        tv = left_out_mass(q, k[:, :, :t + 1], info.selection, cache.indexed_length)
        assert (tv <= info.mass_bound * (1 + 1e-9) + 1e-300).all()
    empty = hsr.HSRKVCache(1, 1, D)
    empty.rebuild()  # nothing indexed: nothing to build
    assert empty.tree_builds == 0


@pytest.mark.parametrize("policy, keeps", [(hsr.Softmax(eps=1e-3), False), (hsr.ReLU(bias=1.0), False),
                                           (hsr.ReLU(bias=1.0, select="tree+sketch"), False),
                                           (hsr.ReLU(bias=1.0, select="index"), True), (hsr.TopK(8), True),
                                           (hsr.Softmax(threshold=1.0), True)])
def test_index_keeps_a_float_copy_of_the_keys_only_for_policies_that_query_it(policy, keeps):
    B, Hkv, D, n = 1, 2, 64, 1024
    k, v, _ = stream("clustered", B, Hkv, n, D)
    cache = hsr.HSRKVCache(B, Hkv, D, dtype=torch.bfloat16, leaf_size=64, policy=policy)
    cache.prefill(k.bfloat16(), v.bfloat16())
    mem = cache.memory_bytes
    assert cache._index.keeps_points == keeps
    assert mem["kv"] == B * Hkv * n * 2 * D * 2
    assert mem["total"] == mem["kv"] + mem["sketch"] + mem["index"]
    copy = B * Hkv * n * D * 4
    assert (mem["index"] > copy) == keeps
    # The int8 sketch: a byte per channel plus two floats per group of 32; value and key norm
    # bounds and a position.
    assert mem["sketch"] == B * Hkv * n * (D + 2 * 4 * (D // 32) + 4 + 4 + 8)
