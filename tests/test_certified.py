"""hsr.certified_attention: the reported bounds hold against exact (fp64) dense attention."""

import math

import pytest
import torch

import hsr
from attention_cases import clustered_keys
from reference import softmax_certificate_ref


def keys_for(kind, B, Hkv, n, D, g):
    if kind == "gaussian":
        return torch.randn(B, Hkv, n, D, generator=g)
    if kind == "clustered":
        return clustered_keys(B, Hkv, n, D, 8, g)
    if kind == "few_huge":  # a handful of keys dominate the softmax
        k = torch.randn(B, Hkv, n, D, generator=g) * 0.1
        k[:, :, :3] *= 200
        return k
    if kind == "identical":  # every key the same: flat scores
        return torch.randn(B, Hkv, 1, D, generator=g).expand(B, Hkv, n, D).contiguous()
    if kind == "long_tail":  # scores decreasing slowly along the sequence
        base = torch.randn(B, Hkv, 1, D, generator=g)
        return base * torch.linspace(3, -3, n).view(1, 1, n, 1) + 0.05 * torch.randn(B, Hkv, n, D, generator=g)
    if kind == "group_edges":  # one large channel per quantization group
        k = torch.randn(B, Hkv, n, D, generator=g)
        k[..., ::32] *= 50
        return k
    raise ValueError(kind)


SELECTS = ["sketch", "tree+sketch", "tree"]


def certify(q, k, v, eps, select="sketch", leaf_size=64, **kw):
    """hsr.certified_attention with the given selection: every key's sketch, the tree then
    the sketch, or the tree alone."""
    sketch = None if select == "tree" else hsr.KeySketch.from_keys(k)
    index = None if select == "sketch" else hsr.HSRIndexBatch(k.float(), leaf_size=leaf_size)
    return hsr.certified_attention(q, k, v, sketch, eps=eps, index=index, **kw)


def check_certificate(q, k, v, out, info, eps, out_tol=1e-5):
    """True left-out mass <= mass_bound <= eps; |o - o_S| <= error_bound; out ~ o_S (out_tol:
    the kernel's own rounding, e.g. of a bf16 output)."""
    B, Hq, _, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D)
    for b in range(B):
        for h in range(Hkv):
            bh = b * Hkv + h
            ids = info.ids[info.offsets[bh]:info.offsets[bh + 1]]
            mask = info.mask[info.offsets[bh]:info.offsets[bh + 1]]
            assert info.keys_read[b, h] == ids.numel()
            for gi in range(G):
                hq = h * G + gi
                s = (k[b, h].double() @ q[b, hq, 0].double()) * scale
                p = torch.softmax(s, 0)
                sel = torch.zeros(n, dtype=torch.bool)
                sel[ids[mask[:, gi]]] = True
                assert int(sel.sum()) == info.keys_selected[b, hq]
                left = float(p[~sel].sum())
                bound = float(info.mass_bound[b, hq])
                assert left <= bound * (1 + 1e-9) + 1e-300, f"left-out mass {left} > bound {bound}"
                assert bound <= eps, f"certificate {bound} above eps {eps}"
                o = p @ v[b, h].double()
                p_sel = torch.softmax(s.masked_fill(~sel, float("-inf")), 0) if sel.any() else torch.zeros(n)
                o_sel = p_sel.double() @ v[b, h].double()  # no key selected: the output is 0
                err = float((o - o_sel).norm())
                assert err <= float(info.error_bound[b, hq]) * (1 + 1e-9) + 1e-300
                torch.testing.assert_close(out[b, hq, 0].double(), o_sel, atol=out_tol, rtol=out_tol)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("kind", ["gaussian", "clustered", "few_huge", "identical", "long_tail", "group_edges"])
@pytest.mark.parametrize("eps", [1e-1, 1e-3])
def test_bounds_hold_and_meet_eps(kind, eps, select):
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, n, D = 2, 2, 3, 700, 64
    k = keys_for(kind, B, Hkv, n, D, g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    if kind == "few_huge":
        q[:, :, 0] = k[:, :, 0].repeat_interleave(G, 1) / 50  # aligned with the huge keys
    out, info = certify(q, k, v, eps, select, leaf_size=16)
    check_certificate(q, k, v, out, info, eps)
    if kind == "few_huge" and select != "tree":  # the dominant keys are enough
        assert info.keys_selected.max() < 50
    assert (info.index_stats is None) == (select == "sketch")


@pytest.mark.parametrize("select", SELECTS)
def test_negative_scores_and_bf16_keys(select):
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, n, D = 1, 1, 4, 513, 72
    k = (torch.randn(B, Hkv, n, D, generator=g) - 3).to(torch.bfloat16)
    v = torch.randn(B, Hkv, n, D, generator=g).to(torch.bfloat16)
    q = (torch.rand(B, G, 1, D, generator=g) * 2).to(torch.bfloat16)  # positive q, negative keys
    out, info = certify(q, k, v, 1e-2, select)
    assert out.dtype == torch.bfloat16
    check_certificate(q.float(), k.float(), v.float(), out.float(), info, 1e-2, out_tol=1e-2)


@pytest.mark.parametrize("select", SELECTS)
def test_bounds_shrink_to_zero_with_eps(select):
    g = torch.Generator().manual_seed(2)
    k = keys_for("clustered", 1, 2, 400, 64, g)
    v = torch.randn(1, 2, 400, 64, generator=g)
    q = torch.randn(1, 4, 1, 64, generator=g) * 3
    previous = None
    for eps in [1e-1, 1e-2, 1e-3, 1e-5, 0.0]:
        out, info = certify(q, k, v, eps, select, leaf_size=8)
        check_certificate(q, k, v, out, info, eps)
        if previous is not None and select == "sketch":  # one histogram cut, moving down
            assert (info.keys_selected >= previous).all()
        previous = info.keys_selected
    assert (info.mass_bound == 0).all() and (info.error_bound == 0).all()
    assert (info.keys_selected == 400).all()
    torch.testing.assert_close(out, hsr.attention(q, k, v), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("select", SELECTS)
def test_gqa_group_reads_the_union_once(select):
    g = torch.Generator().manual_seed(3)
    k = keys_for("clustered", 1, 1, 600, 64, g)
    v = torch.randn(1, 1, 600, 64, generator=g)
    q = torch.randn(1, 4, 1, 64, generator=g) * 3
    out, info = certify(q, k, v, 1e-2, select)
    assert info.keys_selected.max() <= info.keys_read[0, 0] <= info.keys_selected.sum()
    assert torch.equal(info.ids, torch.unique(info.ids))  # each key once, in order
    assert (info.mask.any(1)).all()  # every key read is used by some head


@pytest.mark.parametrize("select", SELECTS)
def test_single_key(select):
    k = torch.randn(1, 1, 1, 64)
    v = torch.randn(1, 1, 1, 64)
    q = torch.randn(1, 2, 1, 64)
    out, info = certify(q, k, v, 0.5, select)
    # One key: whatever is left out, the bound covers it; the output is that key's value
    # when it is kept.
    check_certificate(q, k, v, out, info, 0.5)


def test_bad_inputs_raise():
    k = torch.randn(1, 2, 10, 64)
    v = torch.randn(1, 2, 10, 64)
    q = torch.randn(1, 4, 1, 64)
    sk = hsr.KeySketch.from_keys(k)
    with pytest.raises(ValueError, match="eps"):
        hsr.certified_attention(q, k, v, sk, eps=1.0)
    with pytest.raises(ValueError, match="eps"):
        hsr.certified_attention(q, k, v, sk, eps=-0.1)
    with pytest.raises(ValueError, match="decode"):
        hsr.certified_attention(torch.randn(1, 4, 2, 64), k, v, sk, eps=0.1)
    with pytest.raises(ValueError, match="multiple"):
        hsr.certified_attention(torch.randn(1, 3, 1, 64), k, v, sk, eps=0.1)
    with pytest.raises(ValueError, match="sketch"):
        hsr.certified_attention(q, k, v, hsr.KeySketch.from_keys(k[:, :, :5]), eps=0.1)
    with pytest.raises(ValueError, match="at least one key"):
        hsr.certified_attention(q, k[:, :, :0], v[:, :, :0], hsr.KeySketch.from_keys(k[:, :, :0]), eps=0.1)
    with pytest.raises(ValueError, match="sketch"):  # no sketch and no index
        hsr.certified_attention(q, k, v, None, eps=0.1)
    with pytest.raises(ValueError, match="index"):
        hsr.certified_attention(q, k, v, sk, eps=0.1, index=hsr.HSRIndexBatch(k[:, :, :9]))
    with pytest.raises(ValueError, match="index"):
        hsr.certified_attention(q, k, v, sk, eps=0.1, index=hsr.HSRIndex(64))


def test_certified_select_checks_its_arguments():
    k = torch.randn(1, 2, 10, 64)
    index = hsr.HSRIndexBatch(k)
    sk = hsr.KeySketch.from_keys(k)
    q = torch.randn(1, 4, 64)
    vn, vmax = torch.rand(1, 2, 10), torch.ones(1, 2)
    select = index._impl.certified_select
    with pytest.raises(ValueError, match="q must be"):
        select(torch.randn(1, 3, 64), sk.codes, sk.lo, sk.delta, 8, 32, vn, vmax, 0.1, 0.1)
    with pytest.raises(ValueError, match="codes"):
        select(q, sk.codes[:, :, :5], sk.lo, sk.delta, 8, 32, vn, vmax, 0.1, 0.1)
    with pytest.raises(ValueError, match="together"):
        select(q, sk.codes, None, sk.delta, 8, 32, vn, vmax, 0.1, 0.1)
    with pytest.raises(ValueError, match="v_norms"):
        select(q, sk.codes, sk.lo, sk.delta, 8, 32, vn[:, :, :5], vmax, 0.1, 0.1)
    with pytest.raises(ValueError, match="v_norm_max"):
        select(q, sk.codes, sk.lo, sk.delta, 8, 32, vn, vmax[:, :1], 0.1, 0.1)
    with pytest.raises(ValueError, match="bits"):
        select(q, sk.codes, sk.lo, sk.delta, 5, 32, vn, vmax, 0.1, 0.1)
    with pytest.raises(ValueError, match="eps"):
        select(q, sk.codes, sk.lo, sk.delta, 8, 32, vn, vmax, 0.1, 1.0)
    with pytest.raises(ValueError, match="scale"):
        select(q, sk.codes, sk.lo, sk.delta, 8, 32, vn, vmax, -1.0, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        select(q * float("nan"), sk.codes, sk.lo, sk.delta, 8, 32, vn, vmax, 0.1, 0.1)


def test_tree_prunes_whole_clusters():
    # Well separated clusters and a query aimed at one: the tree opens few leaves, the sketch
    # is computed only for the keys in them, and the certificate still holds.
    g = torch.Generator().manual_seed(6)
    n, D = 4096, 64
    centers = torch.randn(64, D, generator=g) * 3
    k = (centers.repeat_interleave(n // 64, 0) + 0.1 * torch.randn(n, D, generator=g)).view(1, 1, n, D)
    v = torch.randn(1, 1, n, D, generator=g)
    q = (centers[:2] * 0.5).view(1, 2, 1, D)
    out, info = certify(q, k, v, 1e-3, "tree+sketch")
    check_certificate(q, k, v, out, info, 1e-3)
    nodes, leaves, sketched, boxes = (int(x) for x in info.index_stats)
    assert leaves * 64 <= n // 4 and sketched <= n // 4
    assert boxes == nodes  # the certified walk reads every visited node's box


def test_error_bound_is_reached_when_left_out_values_oppose_the_kept_ones():
    # The selection depends on q and k only; values that point one way on the kept keys and
    # the other way on the left-out ones make |o - o_S| = tau_true * |o_T - o_S| equal to
    # tau_true * (max |v| left out + max |v| kept): the bound's form, with tau_bar close to
    # tau_true (sharp scores, tight sketch).
    g = torch.Generator().manual_seed(4)
    n, D = 2000, 64
    k = keys_for("long_tail", 1, 1, n, D, g)
    q = k[:, :, :1].clone() * 0.3
    sketch = hsr.KeySketch.from_keys(k)
    _, first = hsr.certified_attention(q, k, torch.randn(1, 1, n, D, generator=g), sketch, eps=1e-2)
    sel = torch.zeros(n, dtype=torch.bool)
    sel[first.ids[first.mask[:, 0]]] = True
    assert 0 < sel.sum() < n
    v = torch.zeros(1, 1, n, D)
    v[0, 0, :, 0] = torch.where(sel, -1.0, 1.0)
    out, info = hsr.certified_attention(q, k, v, sketch, eps=1e-2)
    assert torch.equal(info.ids, first.ids) and torch.equal(info.mask, first.mask)
    check_certificate(q, k, v, out, info, 1e-2)
    s = (k[0, 0].double() @ q[0, 0, 0].double()) / math.sqrt(D)
    p = torch.softmax(s, 0)
    o = p @ v[0, 0].double()
    o_sel = torch.softmax(s.masked_fill(~sel, float("-inf")), 0) @ v[0, 0].double()
    err = float((o - o_sel).norm())
    assert 0.5 * float(info.error_bound[0, 0]) <= err <= float(info.error_bound[0, 0])


def test_select_by_bounds_keeps_enough_and_reports_what_it_left():
    g = torch.Generator().manual_seed(5)
    est = torch.randn(3, 5000, generator=g) * 20
    rad = torch.rand(3, 5000, generator=g) * 2
    vn = torch.rand(5000, generator=g) * 3
    scale = 0.125
    for eps in (0.3, 1e-2, 1e-4):
        chosen, log_left, v_left, v_kept = torch.ops.hsr.select_by_bounds(est, rad, vn, scale, eps)
        up = (est.double() + rad.double()) * scale
        lo = (est.double() - rad.double()) * scale
        for r in range(3):
            kept, left = chosen[r], ~chosen[r]
            assert kept.any()
            z_low = torch.logsumexp(lo[r, kept], 0)
            t_up = torch.logsumexp(up[r, left], 0) if left.any() else torch.tensor(float("-inf"))
            # Reported, rounded up: the per-key e^u come from a table's chords, within a
            # factor 1 + (1/32)^2 / 8 of the exact sum.
            assert float(t_up) <= float(log_left[r]) <= float(t_up) + math.log1p(1.25e-4)
            assert float(t_up - z_low) <= math.log(eps / (1 - eps)) + 1e-9  # the rule holds
            assert float(v_kept[r]) == float(vn[kept].max())
            assert float(v_left[r]) == (float(vn[left].max()) if left.any() else 0.0)
            # Keys kept are never below keys left out by more than a bin (about 0.03 logits).
            if left.any():
                assert float(up[r, kept].min()) >= float(up[r, left].max()) - 64 / 2048 - 1e-9
    chosen, log_left, _, _ = torch.ops.hsr.select_by_bounds(est, rad, vn, scale, 0.0)
    assert chosen.all() and torch.isinf(log_left).all()


def test_select_by_bounds_bad_inputs_and_opcheck():
    est, rad, vn = torch.randn(2, 10), torch.rand(2, 10), torch.rand(10)
    with pytest.raises(ValueError, match="eps"):
        torch.ops.hsr.select_by_bounds(est, rad, vn, 0.1, 1.0)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.hsr.select_by_bounds(est, rad, vn, 0.0, 0.1)
    with pytest.raises(ValueError, match="radius"):
        torch.ops.hsr.select_by_bounds(est, rad[:, :5], vn, 0.1, 0.1)
    with pytest.raises(ValueError, match="v_norms"):
        torch.ops.hsr.select_by_bounds(est, rad, vn[:5], 0.1, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.hsr.select_by_bounds(est * float("nan"), rad, vn, 0.1, 0.1)
    torch.library.opcheck(torch.ops.hsr.select_by_bounds.default, (est, rad, vn, 0.1, 0.1))


@pytest.mark.parametrize("rule", ["topk", "threshold", "paper"])
def test_fixed_choices_report_a_valid_certificate(rule):
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, n, D = 2, 2, 3, 500, 64
    k = keys_for("clustered", B, Hkv, n, D, g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    sketch, index = hsr.KeySketch.from_keys(k), hsr.HSRIndexBatch(k)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.repeat_interleave(G, 1).double()) / math.sqrt(D)
    if rule == "topk":
        out, info = hsr.topk_attention(q, k, v, index, sketch, k_top=37)
        assert (info.keys_selected == 37).all()
        expect = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(37, dim=2).indices, True)
    elif rule == "threshold":
        out, info = hsr.threshold_attention(q, k, v, index, sketch, threshold=1.5)
        expect = scores >= 1.5
    else:
        out, info = hsr.threshold_attention(q, k, v, index, sketch, threshold="paper")
        stats = [hsr.KeyStats.from_keys(k[b, h]) for b in range(B) for h in range(Hkv)]
        b_raw = torch.stack([hsr.paper_threshold(q[b, h * G:(h + 1) * G, 0], stats[b * Hkv + h], n)
                             for b in range(B) for h in range(Hkv)]).view(B, Hkv * G, 1)
        expect = scores * math.sqrt(D) >= b_raw
    got = torch.zeros_like(expect)
    for b in range(B):
        for h in range(Hkv):
            rows = slice(int(info.offsets[b * Hkv + h]), int(info.offsets[b * Hkv + h + 1]))
            for gi in range(G):
                got[b, h * G + gi, info.ids[rows][info.mask[rows, gi]]] = True
    # Exact up to float rounding at the threshold: only keys within 1e-4 of it may differ.
    differ = got != expect
    if rule == "threshold":
        assert (differ <= ((scores - 1.5).abs() < 1e-4)).all()
    elif rule == "paper":
        assert (differ <= ((scores * math.sqrt(D) - b_raw).abs() < 1e-3)).all()
    else:
        assert not differ.any()
    check_certificate(q, k, v, out, info, 1.0)


def test_fixed_choice_bad_inputs():
    k = torch.randn(1, 2, 10, 64)
    v = torch.randn(1, 2, 10, 64)
    q = torch.randn(1, 4, 1, 64)
    sk, index = hsr.KeySketch.from_keys(k), hsr.HSRIndexBatch(k)
    with pytest.raises(ValueError, match="chosen"):
        hsr.fixed_set_attention(q, k, v, sk, torch.ones(1, 4, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="chosen"):
        hsr.fixed_set_attention(q, k, v, sk, torch.ones(1, 4, 10))
    with pytest.raises(ValueError, match="k_top"):
        hsr.topk_attention(q, k, v, index, sk, k_top=0)
    with pytest.raises(ValueError, match="threshold"):
        hsr.threshold_attention(q, k, v, index, sk, threshold="median")
    with pytest.raises(ValueError, match="threshold"):
        hsr.threshold_attention(q, k, v, index, sk, threshold=float("nan"))
    with pytest.raises(ValueError, match="index"):
        hsr.topk_attention(q, k, v, hsr.HSRIndexBatch(k[:, :, :3]), sk, k_top=2)
    # More than n: every key, nothing left out.
    out, info = hsr.topk_attention(q, k, v, index, sk, k_top=50)
    assert (info.keys_selected == 10).all() and (info.mass_bound == 0).all()


def _pairwise_selection(q, sketch, v_norms, scale, eps):
    """The sketch selection composed pair by pair from the two single-purpose ops."""
    B, Hq, D = q.shape
    Hkv = sketch.codes.shape[1]
    G = Hq // Hkv
    offsets, ids, masks, per_head = [0], [], [], []
    for b in range(B):
        for h in range(Hkv):
            est, rad = torch.ops.hsr.sketch_score_intervals(q[b, h * G:(h + 1) * G].contiguous(), sketch.codes[b, h],
                                                            sketch.lo[b, h], sketch.delta[b, h], sketch.bits,
                                                            sketch.group)
            chosen, left, v_l, v_k = torch.ops.hsr.select_by_bounds(est, rad, v_norms[b, h].contiguous(), scale, eps)
            union = torch.nonzero(chosen.any(0)).flatten()
            ids.append(union)
            masks.append(chosen[:, union].T)
            offsets.append(offsets[-1] + union.numel())
            per_head.append((left, v_l, v_k, chosen.sum(1)))
    return (torch.tensor(offsets), torch.cat(ids), torch.cat(masks),
            *[torch.cat([p[i] for p in per_head]).view(B, Hq) for i in range(4)])


@pytest.mark.parametrize("B,Hkv,G,n,D,bits", [(1, 1, 1, 1, 128, 8), (2, 3, 3, 1025, 128, 8), (1, 2, 4, 97, 64, 8),
                                              (1, 2, 2, 300, 97, 8), (1, 2, 2, 300, 128, 4)])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2])
def test_sketch_select_equals_the_pairwise_composition(B, Hkv, G, n, D, bits, eps):
    g = torch.Generator().manual_seed(n + D)
    k = clustered_keys(B, Hkv, n, D, 4, g)
    q = torch.randn(B, Hkv * G, D, generator=g) * 2
    sketch = hsr.KeySketch.from_keys(k, bits=bits)
    v_norms = torch.rand(B, Hkv, n, generator=g) * 3
    scale = 1 / math.sqrt(D)
    got = torch.ops.hsr.sketch_select(q, sketch.codes, sketch.lo, sketch.delta, bits, 32, v_norms, scale, eps)
    want = _pairwise_selection(q, sketch, v_norms, scale, eps)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if eps == 0.0:
        assert int(got[0][-1]) == B * Hkv * n  # everything kept
    # Strided views (a growing cache's buffers) give the same answer without a copy of the rows.
    wide = [torch.zeros(B, Hkv, n + 7, t.shape[-1], dtype=t.dtype) for t in (sketch.codes, sketch.lo, sketch.delta)]
    for w, t in zip(wide, (sketch.codes, sketch.lo, sketch.delta)):
        w[:, :, :n] = t
    vn_wide = torch.zeros(B, Hkv, n + 7)
    vn_wide[:, :, :n] = v_norms
    views = [w[:, :, :n] for w in wide]
    again = torch.ops.hsr.sketch_select(q, *views, bits, 32, vn_wide[:, :, :n], scale, eps)
    for a, b in zip(again, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_sketch_relu_select_reports_every_key_that_can_pass(bits):
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, n, D = 2, 2, 3, 777, 64
    k = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g)
    sketch = hsr.KeySketch.from_keys(k, bits=bits)
    scale, bias = 0.125, 0.3
    offsets, ids, mask, counts = torch.ops.hsr.sketch_relu_select(q, sketch.codes, sketch.lo, sketch.delta, bits,
                                                                  32, scale, bias)
    exact = torch.einsum("bhgd,bhnd->bhgn", q.view(B, Hkv, G, D).double(), k.double()) * scale
    for p in range(B * Hkv):
        b, h = divmod(p, Hkv)
        rows = slice(int(offsets[p]), int(offsets[p + 1]))
        chosen = torch.zeros(G, n, dtype=torch.bool)
        chosen[:, ids[rows]] = mask[rows].T
        est, rad = torch.ops.hsr.sketch_score_intervals(q[b, h * G:(h + 1) * G].contiguous(), sketch.codes[b, h],
                                                        sketch.lo[b, h], sketch.delta[b, h], bits, 32)
        up = (est.double() + rad.double()) * scale
        assert torch.equal(chosen, up + up.abs() * 1e-12 + 1e-300 > bias)  # the op widens by a hair
        assert bool((chosen | (exact[b, h] <= bias)).all())  # no key with a positive weight is missed
        assert torch.equal(counts[b, h * G:(h + 1) * G], chosen.sum(1))
        assert torch.equal(ids[rows], ids[rows].sort().values)


def test_sketch_select_bad_inputs_and_opcheck():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 50, 32, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    q, vn = torch.randn(1, 4, 32, generator=g), torch.rand(1, 2, 50, generator=g)
    args = (sk.codes, sk.lo, sk.delta, 8, 32)
    sel, relu = torch.ops.hsr.sketch_select, torch.ops.hsr.sketch_relu_select
    with pytest.raises(ValueError, match="eps"):
        sel(q, *args, vn, 0.1, 1.0)
    with pytest.raises(ValueError, match="scale"):
        sel(q, *args, vn, -1.0, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        sel(q[:, :3], *args, vn, 0.1, 0.1)
    with pytest.raises(ValueError, match="v_norms"):
        sel(q, *args, vn[:, :, :10], 0.1, 0.1)
    with pytest.raises(ValueError, match="lo"):
        sel(q, sk.codes, sk.lo[:, :, :10], sk.delta, 8, 32, vn, 0.1, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        sel(q * float("nan"), *args, vn, 0.1, 0.1)
    with pytest.raises(ValueError, match="not finite"):
        sel(q, sk.codes, sk.lo * float("inf"), sk.delta, 8, 32, vn, 0.1, 0.1)
    with pytest.raises(ValueError, match="not finite"):
        sel(q, *args, vn * float("nan"), 0.1, 0.1)
    for bad in (-1.0, float("inf"), float("nan")):  # one bad bound among the keys of one pair
        one = vn.clone()
        one[0, 1, 37] = bad
        with pytest.raises(ValueError, match="not finite"):
            sel(q, *args, one, 0.1, 0.1)
    with pytest.raises(ValueError, match="bias"):
        relu(q, *args, 0.1, float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        relu(q, sk.codes, sk.lo, sk.delta * float("nan"), 8, 32, 0.1, 0.0)
    torch.library.opcheck(sel.default, (q, *args, vn, 0.1, 1e-2))
    torch.library.opcheck(relu.default, (q, *args, 0.1, 0.0))


@pytest.mark.parametrize("order", ["ascending", "descending", "spread"])
def test_select_by_bounds_when_the_best_key_keeps_moving(order):
    # Keys arriving in ascending score order move the histogram's reference at almost every
    # key (and across more than its depth); the rule and the reported mass must still hold.
    g = torch.Generator().manual_seed(11)
    n = 3000
    if order == "spread":  # scores over ~200 logits: most keys fall past the histogram's depth
        est = torch.linspace(-1600, 0, n)[torch.randperm(n, generator=g)]
    else:
        est = torch.linspace(-400, 40, n) * (1 if order == "ascending" else -1)
    est = est.view(1, n)
    rad = torch.rand(1, n, generator=g) * 0.5
    vn = torch.rand(n, generator=g)
    scale = 0.125
    for eps in (1e-1, 1e-3, 1e-6):
        chosen, log_left, v_left, v_kept = torch.ops.hsr.select_by_bounds(est, rad, vn, scale, eps)
        up = (est.double() + rad.double()) * scale
        lo = (est.double() - rad.double()) * scale
        kept, left = chosen[0], ~chosen[0]
        z_low = torch.logsumexp(lo[0, kept], 0)
        t_up = torch.logsumexp(up[0, left], 0) if left.any() else torch.tensor(float("-inf"))
        assert float(t_up) <= float(log_left[0]) <= float(t_up) + math.log1p(1.25e-4) + 1e-12
        assert float(t_up - z_low) <= math.log(eps / (1 - eps)) + 1e-9
        assert float(up[0, kept].min()) >= float(up[0, left].max()) - 64 / 2048 - 1e-9 if left.any() else True
        assert float(v_kept[0]) == float(vn[kept].max())


def _block_means(v, block):
    B, H, n, D = v.shape
    nb = -(-n // block)
    padded = torch.zeros(B, H, nb * block, D)
    padded[:, :, :n] = v.float()
    counts = torch.full((nb,), float(block))
    counts[-1] = n - (nb - 1) * block
    return padded.view(B, H, nb, block, D).sum(3) / counts.view(1, 1, nb, 1)


def test_sketch_select_estimate_weights_match_the_sketch_scores():
    g = torch.Generator().manual_seed(21)
    B, Hkv, G, n, D, block = 1, 2, 3, 1000, 64, 64
    k = clustered_keys(B, Hkv, n, D, 6, g)
    q = torch.randn(B, Hkv * G, D, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    vn = torch.rand(B, Hkv, n, generator=g)
    scale = 1 / 8
    args = (q, sk.codes, sk.lo, sk.delta, 8, 32, vn, scale, 0.05)
    got = torch.ops.hsr.sketch_select_estimate(*args, block)
    plain = torch.ops.hsr.sketch_select(*args)
    for a, b in zip(got[:7], plain):
        assert torch.equal(a, b)  # the selection is the certified one
    offsets, ids, mask, weights, log_ref = got[0], got[1], got[2], got[7], got[8]
    assert weights.shape == (B, Hkv * G, -(-n // block))
    for p in range(B * Hkv):
        b, h = divmod(p, Hkv)
        est, _ = torch.ops.hsr.sketch_score_intervals(q[b, h * G:(h + 1) * G].contiguous(), sk.codes[b, h],
                                                      sk.lo[b, h], sk.delta[b, h], 8, 32)
        rows = slice(int(offsets[p]), int(offsets[p + 1]))
        for gi in range(G):
            hq = h * G + gi
            left = torch.ones(n, dtype=torch.bool)
            left[ids[rows][mask[rows, gi]]] = False
            w = torch.exp(est[gi].double() * scale - log_ref[b, hq]) * left
            want = torch.zeros(weights.shape[-1], dtype=torch.float64).index_add_(0, torch.arange(n) // block, w)
            assert bool((weights[b, hq] >= want * (1 - 1e-6)).all())  # chords lie above e^x
            assert bool((weights[b, hq] <= want * (1 + 1.3e-4) + 1e-300).all())


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "few_huge", "long_tail"])
@pytest.mark.parametrize("eps", [0.3, 1e-2])
def test_estimate_mode_keeps_a_valid_error_bound(kind, eps):
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, n, D, block = 2, 2, 2, 777, 32, 64
    k = keys_for(kind, B, Hkv, n, D, g)
    v = torch.randn(B, Hkv, n, D, generator=g) + 0.3
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    out, info = hsr.certified_attention(q, k, v, sk, eps=eps, value_blocks=_block_means(v, block), block=block)
    plain, plain_info = hsr.certified_attention(q, k, v, sk, eps=eps)
    assert torch.equal(info.mass_bound, plain_info.mass_bound) and bool((info.mass_bound <= eps).all())
    s = torch.einsum("bhgd,bhnd->bhgn", q.view(B, Hkv, G, D).double(), k.double()) / math.sqrt(D)
    o = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v.double()).reshape(B, Hkv * G, D)
    err = (out[:, :, 0].double() - o).norm(dim=-1)
    assert bool((err <= info.error_bound + 1e-5).all())
    assert bool((info.estimate_share >= 0).all() and (info.estimate_share <= 1).all())


def test_estimate_mode_reduces_the_error_when_much_is_left_out():
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, n, D, block = 1, 2, 3, 2048, 64, 64
    k = clustered_keys(B, Hkv, n, D, 8, g)
    v = torch.randn(B, Hkv, n, D, generator=g) + 0.5
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    s = torch.einsum("bhgd,bhnd->bhgn", q.view(B, Hkv, G, D).double(), k.double()) / 8
    o = torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v.double()).reshape(B, Hkv * G, D)
    plain, _ = hsr.certified_attention(q, k, v, sk, eps=0.3)
    est, _ = hsr.certified_attention(q, k, v, sk, eps=0.3, value_blocks=_block_means(v, block), block=block)
    err_plain = (plain[:, :, 0].double() - o).norm(dim=-1).mean()
    err_est = (est[:, :, 0].double() - o).norm(dim=-1).mean()
    assert err_est < 0.7 * err_plain


def test_estimate_mode_bad_inputs():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 100, 16, generator=g), torch.randn(1, 1, 100, 16, generator=g)
    q = torch.randn(1, 2, 1, 16, generator=g)
    sk = hsr.KeySketch.from_keys(k)
    blocks = _block_means(v, 32)
    with pytest.raises(ValueError, match="block"):
        hsr.certified_attention(q, k, v, sk, eps=0.1, value_blocks=blocks, block=0)
    with pytest.raises(ValueError, match="value_blocks"):
        hsr.certified_attention(q, k, v, sk, eps=0.1, value_blocks=blocks[:, :, :2], block=32)
    with pytest.raises(ValueError, match="sketch selection"):
        hsr.certified_attention(q, k, v, sk, eps=0.1, value_blocks=blocks, block=32,
                                index=hsr.HSRIndexBatch(k.float()))
    vn = torch.rand(1, 1, 100, generator=g)
    with pytest.raises(ValueError, match="block"):
        torch.ops.hsr.sketch_select_estimate(q[:, :, 0], sk.codes, sk.lo, sk.delta, 8, 32, vn, 0.25, 0.1, 0)
    torch.library.opcheck(torch.ops.hsr.sketch_select_estimate.default,
                          (q[:, :, 0].contiguous(), sk.codes, sk.lo, sk.delta, 8, 32, vn, 0.25, 0.1, 32))


def test_key_norm_bounds_given_certify_the_same_selection():
    g = torch.Generator().manual_seed(11)
    B, Hkv, G, n, D = 2, 2, 3, 300, 24
    k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    sketch = hsr.KeySketch.from_keys(k)
    out_a, a = hsr.certified_attention(q, k, v, sketch, eps=1e-2)
    norms = hsr.certified.value_norm_bounds(k)
    out_b, b = hsr.certified_attention(q, k, v, sketch, eps=1e-2, k_norms=norms)
    assert torch.equal(out_a, out_b) and torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    # Rounded-up norms can only widen the rounding term, by a hair.
    assert (b.mass_bound >= a.mass_bound).all()
    assert torch.allclose(b.mass_bound, a.mass_bound, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="k_norms"):
        hsr.certified_attention(q, k, v, sketch, eps=1e-2, k_norms=norms[:, :, :-1])


def certificate_case(B, Hkv, G, n, D, dtype, seed):
    """Random inputs of hsr.softmax_certificate: a selection with some pairs empty, heads that
    keep nothing of a pair, heads that leave nothing out (log_left -inf)."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, Hkv, n, D, generator=g) * 3).to(dtype)
    q = torch.randn(B, Hkv * G, D, generator=g)
    chosen = torch.rand(B * Hkv, n, G, generator=g) < 0.3
    chosen[0] = False  # pair 0 keeps nothing
    offsets, ids, masks = [0], [], []
    for p in range(B * Hkv):
        rows = torch.nonzero(chosen[p].any(1)).flatten()
        ids.append(rows), masks.append(chosen[p, rows]), offsets.append(offsets[-1] + rows.numel())
    offsets, ids, mask = torch.tensor(offsets), torch.cat(ids), torch.cat(masks)
    per_head = (B, Hkv * G)
    lse = torch.randn(per_head, generator=g) * 5
    log_left = torch.randn(per_head, generator=g, dtype=torch.float64) * 5
    log_left[0, -1] = float("-inf")
    v_left, v_kept = torch.rand(per_head, generator=g, dtype=torch.float64), torch.rand(per_head, generator=g,
                                                                                        dtype=torch.float64)
    kept = chosen.sum(1).reshape(per_head)
    return q, lse, offsets, ids, mask, k, log_left, v_left, v_kept, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hkv,G,n,D", [(1, 1, 1, 1, 1), (2, 3, 3, 97, 24), (1, 2, 4, 1025, 128)])
@pytest.mark.parametrize("given_norms", [True, False])
@pytest.mark.parametrize("tail", [0, 5])
def test_softmax_certificate_equals_the_tensor_formula(dtype, B, Hkv, G, n, D, given_norms, tail):
    q, lse, offsets, ids, mask, k, log_left, v_left, v_kept, kept = certificate_case(B, Hkv, G, n, D, dtype, n)
    v = torch.randn(B, Hkv, n, 7).to(dtype) * 2
    tail_begin = max(0, n - tail)
    norms = hsr.certified.value_norm_bounds(k[:, :, :tail_begin]) if given_norms else None
    args = (q, lse, offsets, ids, mask, k, norms, v, tail_begin, log_left, v_left, v_kept, kept, 0.3)
    mass, error, kept_max = torch.ops.hsr.softmax_certificate(*args)
    refs = softmax_certificate_ref(*args)
    assert mass.dtype == error.dtype == kept_max.dtype == torch.float64 and mass.shape == (B, Hkv * G)
    for got, ref in zip((mass, error, kept_max), refs):
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert mass[0, -1] == 0 and error[0, -1] == 0  # nothing left out
    assert (kept_max >= v_kept).all() and torch.equal(kept_max > v_kept, refs[2] > v_kept)


def test_softmax_certificate_of_a_strided_cache_view():
    q, lse, offsets, ids, mask, k, log_left, v_left, v_kept, kept = certificate_case(2, 2, 2, 60, 16, torch.bfloat16, 1)
    buffer = torch.zeros(2, 2, 100, 16, dtype=torch.bfloat16)
    buffer[:, :, :60] = k
    view = buffer.narrow(2, 0, 60)
    per_head = (log_left, v_left, v_kept, kept, 0.3)
    a = torch.ops.hsr.softmax_certificate(q, lse, offsets, ids, mask, view, None, view, 50, *per_head)
    b = torch.ops.hsr.softmax_certificate(q, lse, offsets, ids, mask, k, None, k, 50, *per_head)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_softmax_certificate_bad_inputs_and_opcheck():
    q, lse, offsets, ids, mask, k, log_left, v_left, v_kept, kept = certificate_case(1, 2, 2, 30, 8, torch.float32, 2)
    cert = torch.ops.hsr.softmax_certificate
    good = dict(q=q, lse=lse, offsets=offsets, ids=ids, mask=mask, k=k, k_norms=None, v=k, tail_begin=30,
                log_left=log_left, v_left=v_left, v_kept=v_kept, kept=kept, scale=0.3)
    for change, message in ((dict(k=k.double()), "k must be"), (dict(v=k[:, :, :29]), "v must"),
                            (dict(v=k.int()), "v must be"), (dict(q=q[:, :3]), "q must be"),
                            (dict(q=q.double()), "q must be"), (dict(lse=lse[:, :1]), "lse"),
                            (dict(log_left=log_left.float()), "log_left"), (dict(kept=kept.int()), "kept"),
                            (dict(mask=mask[:, :1]), "selection"), (dict(offsets=offsets[:-1]), "selection"),
                            (dict(offsets=offsets.flip(0)), "rise"), (dict(ids=ids + 30), "key rows"),
                            (dict(k_norms=torch.ones(1, 2, 29)), "k_norms"), (dict(tail_begin=31), "tail_begin"),
                            (dict(tail_begin=-1), "tail_begin"), (dict(scale=0.0), "scale"),
                            (dict(scale=float("nan")), "scale")):
        with pytest.raises(ValueError, match=message):
            cert(*{**good, **change}.values())
    torch.library.opcheck(cert.default, tuple(good.values()))


@pytest.mark.parametrize("rule", ["certified", "topk", "threshold"])
def test_a_tail_is_attended_in_full_and_counted_as_kept(rule):
    g = torch.Generator().manual_seed(12)
    B, Hkv, G, n, tail, D = 2, 2, 2, 300, 7, 32
    k = clustered_keys(B, Hkv, n + tail, D, 8, g)
    v = torch.randn(B, Hkv, n + tail, D, generator=g)
    v[:, :, n:] *= 30  # the tail's values dominate v_kept_max
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    sketch = hsr.KeySketch.from_keys(k[:, :, :n])
    index = hsr.HSRIndexBatch(k[:, :, :n].float(), leaf_size=16)
    if rule == "certified":
        out, info = hsr.certified_attention(q, k, v, sketch, eps=1e-2, tail=tail)
    elif rule == "topk":
        out, info = hsr.topk_attention(q, k, v, index, sketch, k_top=10, tail=tail)
    else:
        out, info = hsr.threshold_attention(q, k, v, index, sketch, threshold=1.0, tail=tail)
    scale = 1 / math.sqrt(D)
    tail_norm = v[:, :, n:].double().norm(dim=-1).amax(-1).repeat_interleave(G, 1)
    assert (info.v_kept_max >= tail_norm).all() and int(info.offsets[-1]) == info.ids.numel()
    assert (info.ids < n).all()  # the selection describes the keys before the tail
    for b in range(B):
        for hq in range(Hkv * G):
            h, gi = hq // G, hq % G
            rows = slice(int(info.offsets[b * Hkv + h]), int(info.offsets[b * Hkv + h + 1]))
            seen = torch.zeros(n + tail, dtype=torch.bool)
            seen[info.ids[rows][info.mask[rows, gi]]] = True
            seen[n:] = True
            s = (k[b, h].double() @ q[b, hq, 0].double()) * scale
            p = torch.softmax(s, 0)
            o = p @ v[b, h].double()
            o_seen = torch.softmax(s.masked_fill(~seen, float("-inf")), 0) @ v[b, h].double()
            assert float(p[~seen].sum()) <= float(info.mass_bound[b, hq]) * (1 + 1e-9) + 1e-300
            assert float((o - o_seen).norm()) <= float(info.error_bound[b, hq]) * (1 + 1e-9) + 1e-300
            torch.testing.assert_close(out[b, hq, 0].double(), o_seen, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tail"):
        hsr.certified_attention(q, k, v, sketch, eps=1e-2, tail=n + tail)
    with pytest.raises(ValueError, match="tail"):
        hsr.certified_attention(q, k, v, sketch, eps=1e-2, tail=-1)
    with pytest.raises(ValueError, match="sketch"):
        hsr.certified_attention(q, k, v, sketch, eps=1e-2, tail=tail + 1)
