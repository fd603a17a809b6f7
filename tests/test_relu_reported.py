"""hsr.relu_reported_attention / relu_sketch_attention: ReLU attention over the keys the HSR
index reports, or whose sketch bound passes (every key's, or those of the leaves the tree
keeps), equals dense ReLU attention."""

import pytest
import torch

import hsr
from attention_cases import clustered_keys
from reference import attention_ref


def make(kind, B, Hkv, G, n, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "clustered":
        k = clustered_keys(B, Hkv, n, D, 16, g)
    else:
        k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def run(path, q, k, v, **kw):
    if path == "index":
        return hsr.relu_reported_attention(q, k, v, hsr.HSRIndexBatch(k.float()), **kw)
    index = hsr.HSRIndexBatch(k.float(), keep_points=False) if path == "tree+sketch" else None
    return hsr.relu_sketch_attention(q, k, v, hsr.KeySketch.from_keys(k), index=index, **kw)


def per_head_sets(info, G):
    """{(pair, head): set of selected ids} from a selection (offsets, ids, mask)."""
    out = {}
    for p in range(info.offsets.numel() - 1):
        rows = slice(int(info.offsets[p]), int(info.offsets[p + 1]))
        for g in range(G):
            out[p, g] = set(info.ids[rows][info.mask[rows, g]].tolist())
    return out


@pytest.mark.parametrize("path", ["index", "sketch", "tree+sketch"])
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("bias,alpha,normalize", [(0.0, 1, True), (1.5, 2, True), (3.0, 3, False)])
def test_equals_dense_relu_attention(path, kind, dtype, G, bias, alpha, normalize):
    q, k, v = make(kind, 2, 2, G, 3000, 64, dtype)
    out, info = run(path, q, k, v, bias=bias, alpha=alpha, normalize=normalize)
    # As accurate as the dense kernel, against the fp64 reference (FlashAttention-style rule).
    dense = hsr.attention(q, k, v, kind="relu", bias=bias, alpha=alpha, normalize=normalize)
    ref, _ = attention_ref(q, k, v, kind="relu", bias=bias, alpha=alpha, normalize=normalize)
    dense_err = (dense.double() - ref).abs().max().item()
    floor = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, ref.abs().max().item())
    assert (out.double() - ref).abs().max().item() <= 2 * dense_err + floor
    # What was reported is what has a positive weight (up to ties at the threshold).
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(),
                     k.float().repeat_interleave(G, 1)) / 8.0
    positive = (s > bias).sum(-1)
    if path == "index":  # exactly the keys with a positive weight (up to ties)
        assert (info.keys_reported - positive).abs().max() <= 1
    else:  # a superset: the sketch's upper bounds
        assert (info.keys_reported >= positive - 1).all()
    assert (info.keys_read >= info.keys_reported.view(2, 2, G).amax(-1)).all()


@pytest.mark.parametrize("path", ["index", "sketch", "tree+sketch"])
def test_a_selective_bias_reads_few_keys(path):
    q, k, v = make("clustered", 1, 2, 4, 20_000, 64, torch.float32, seed=1)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(4, 1)) / 8.0
    bias = float(torch.quantile(s.flatten(), 0.995))
    out, info = run(path, q, k, v, bias=bias, alpha=2)
    torch.testing.assert_close(out, hsr.attention(q, k, v, kind="relu", bias=bias, alpha=2), atol=1e-5, rtol=1e-5)
    assert info.keys_read.max() < 0.05 * 20_000
    if path == "tree+sketch":  # the tree left most leaves out: few keys had their sketch scored
        nodes, leaves, sketched, boxes = info.index_stats.tolist()
        assert 0 < sketched < 0.2 * 2 * 20_000 and leaves * 64 >= sketched and boxes <= nodes


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("quantile", [0.5, 0.99, 0.9995])
def test_tree_and_sketch_select_between_the_positive_keys_and_the_sketch_alone(kind, quantile):
    # Per q head: every key with a positive weight, and only keys the sketch alone would
    # select (the tree drops keys, or keeps whole nodes whose keys all pass).
    G = 3
    q, k, v = make(kind, 2, 2, G, 2000, 48, torch.float32, seed=3)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(G, 1)) / 48 ** 0.5
    bias = float(torch.quantile(s.flatten(), quantile))
    _, tree = run("tree+sketch", q, k, v, bias=bias)
    _, alone = run("sketch", q, k, v, bias=bias)
    tree_sets, alone_sets = per_head_sets(tree, G), per_head_sets(alone, G)
    for (p, g), chosen in tree_sets.items():
        positive = set(torch.nonzero(s[p // 2, (p % 2) * G + g] > bias)[:, 0].tolist())
        assert positive <= chosen <= alone_sets[p, g]
        assert len(chosen) == int(tree.keys_reported.view(-1)[p * G + g])


@pytest.mark.parametrize("kind,n,D", [("clustered", 20000, 128), ("slabs", 6000, 8), ("clustered", 6000, 7)])
def test_tree_and_sketch_exact_whether_or_not_the_walk_keeps_reading_node_boxes(kind, n, D):
    # The walk stops reading node boxes when they rarely settle a node (the clustered D=128
    # keys) and keeps them where they do (slabs: keys on 16 planes x_0 = c, queries along
    # x_0, so a node's box is as thin along q as its planes are, its ball is not); either way
    # no key with a positive weight is left out.
    G = 4
    g = torch.Generator().manual_seed(11)
    if kind == "slabs":
        k = torch.rand(1, 2, n, D, generator=g) * 4 - 2
        k[..., 0] = torch.randint(-8, 8, (1, 2, n), generator=g).float() * 2.5
        q = torch.zeros(1, 2 * G, 1, D)
        q[..., 0] = torch.tensor([1.0, -1.0, 2.0, -0.5] * 2).view(1, 2 * G, 1)
        v = torch.randn(1, 2, n, D, generator=g)
    else:
        q, k, v = make(kind, 1, 2, G, n, D, torch.float32, seed=11)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(G, 1)) / D ** 0.5
    for quantile in (0.9, 0.99):
        # Off the slabs' discrete scores (0.44 apart at least): no key sits at the bias itself.
        bias = float(torch.quantile(s.flatten(), quantile)) + 0.1
        out, tree = run("tree+sketch", q, k, v, bias=bias)
        _, alone = run("sketch", q, k, v, bias=bias)
        tree_sets, alone_sets = per_head_sets(tree, G), per_head_sets(alone, G)
        for (p, h), chosen in tree_sets.items():
            positive = set(torch.nonzero(s[0, p * G + h] > bias)[:, 0].tolist())
            assert positive <= chosen <= alone_sets[p, h]
        ref, _ = attention_ref(q.double(), k.double(), v.double(), kind="relu", bias=bias)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        nodes, _, _, boxes = tree.index_stats.tolist()
        if D == 128:  # the boxes stopped paying within the first nodes
            assert boxes < nodes / 10
        if kind == "slabs":  # read wherever the ball left a node open: most of the nodes visited
            assert boxes >= nodes / 2


@pytest.mark.parametrize("D,G", [(64, 2), (37, 1)])
def test_tree_and_sketch_scan_every_sketch_when_the_tree_cannot_prune(D, G):
    # Gaussian keys without clusters: every leaf's ball reaches a bias at the 99th percentile,
    # so the walk gives up where it would open most leaves and scans every key's sketch
    # instead (leaves opened 0, every key sketched): the sketch-alone selection, exact output.
    q, k, v = make("random", 2, 2, G, 3000, D, torch.float32, seed=4)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(G, 1)) / D ** 0.5
    bias = float(torch.quantile(s.flatten(), 0.99))
    out, tree = run("tree+sketch", q, k, v, bias=bias)
    _, alone = run("sketch", q, k, v, bias=bias)
    nodes, leaves, sketched, _ = tree.index_stats.tolist()
    assert leaves == 0 and sketched == 4 * 3000 and nodes > 0
    assert per_head_sets(tree, G) == per_head_sets(alone, G)
    assert torch.equal(tree.keys_reported, alone.keys_reported)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), kind="relu", bias=bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # The index's scan_fraction sets where the walk gives up: at 1 it never does and opens leaves.
    index = hsr.HSRIndexBatch(k, keep_points=False)
    index.scan_fraction = 1.0
    out, walked = hsr.relu_sketch_attention(q, k, v, hsr.KeySketch.from_keys(k), bias=bias, index=index)
    nodes, leaves, sketched, _ = walked.index_stats.tolist()
    assert leaves > 0 and sketched <= 4 * 3000
    for (p, g), chosen in per_head_sets(walked, G).items():
        assert chosen <= per_head_sets(alone, G)[p, g]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [-0.2, 0.2])
def test_tree_and_sketch_on_duplicated_keys_where_node_bounds_are_tight(offset):
    # 16 distinct keys, each repeated 125 times: leaves hold copies of one key, so a node's
    # bounds are its score (up to rounding). A bias 0.2 below a key's score must keep that
    # key; 0.2 above must leave it out (its sketch bound is within 0.2 of its score).
    g = torch.Generator().manual_seed(5)
    G, D = 2, 48
    distinct = torch.randn(1, 1, 16, D, generator=g) * 2
    k = distinct.repeat_interleave(125, 2)[:, :, torch.randperm(2000, generator=g)].contiguous()
    v = torch.randn(1, 1, 2000, D, generator=g)
    q = torch.randn(1, G, 1, D, generator=g)
    s = (q[0, :, 0] @ k[0, 0].T) / D ** 0.5
    bias = float(s[0].unique()[8]) + offset
    _, tree = run("tree+sketch", q, k, v, bias=bias)
    _, alone = run("sketch", q, k, v, bias=bias)
    tree_sets, alone_sets = per_head_sets(tree, G), per_head_sets(alone, G)
    for g_ in range(G):
        positive = set(torch.nonzero(s[g_] > bias)[:, 0].tolist())
        assert positive <= tree_sets[0, g_] <= alone_sets[0, g_]
    assert tree_sets[0, 0] == set(torch.nonzero(s[0] > bias)[:, 0].tolist())


def test_tree_and_sketch_keep_a_whole_node_only_when_all_its_keys_pass():
    # Two keys 0.3 apart in score along q (so a node holding both has bounds that tight),
    # 125 copies each among 14 far-away keys; the bias between them keeps one and not the other.
    g = torch.Generator().manual_seed(6)
    D = 48
    q = torch.randn(1, 1, 1, D, generator=g)
    distinct = torch.randn(16, D, generator=g) * 2
    u = q[0, 0, 0] / q[0, 0, 0].norm()
    distinct[1] = distinct[0] + 0.3 * D ** 0.5 / q[0, 0, 0].norm() * u
    k = distinct.repeat_interleave(125, 0)[torch.randperm(2000, generator=g)].view(1, 1, 2000, D).contiguous()
    v = torch.randn(1, 1, 2000, D, generator=g)
    s = (q[0, 0, 0] @ k[0, 0].T) / D ** 0.5
    low = float(q[0, 0, 0] @ distinct[0]) / D ** 0.5
    bias = low + 0.2
    _, tree = run("tree+sketch", q, k, v, bias=bias)
    assert per_head_sets(tree, 1)[0, 0] == set(torch.nonzero(s > bias)[:, 0].tolist())


def test_tree_and_sketch_decide_whole_trees_at_the_root():
    q, k, v = make("clustered", 1, 2, 2, 500, 64, torch.float32)
    index = hsr.HSRIndexBatch(k, keep_points=False)
    sk = hsr.KeySketch.from_keys(k)
    # Far below every score: the root's lower bound passes, every key is kept unsketched.
    out, info = hsr.relu_sketch_attention(q, k, v, sk, bias=-1e6, index=index)
    nodes, leaves, sketched, boxes = info.index_stats.tolist()
    assert nodes == 2 and leaves >= 2 * 8 and sketched == 0 and boxes == 0  # the balls decided
    assert (info.keys_reported == 500).all()
    torch.testing.assert_close(out, hsr.attention(q, k, v, kind="relu", bias=-1e6), atol=1e-5, rtol=1e-5)
    # Far above: the root's upper bound fails, nothing is read.
    out, info = hsr.relu_sketch_attention(q, k, v, sk, bias=1e6, index=index)
    assert info.index_stats.tolist() == [2, 0, 0, 0]
    assert (info.keys_read == 0).all() and (out == 0).all()


def test_bad_inputs_raise():
    q, k, v = make("random", 1, 2, 2, 100, 64, torch.float32)
    index = hsr.HSRIndexBatch(k)
    with pytest.raises(ValueError, match="index"):
        hsr.relu_reported_attention(q, k, v, hsr.HSRIndexBatch(k[:, :, :50]), bias=0.0)
    with pytest.raises(ValueError, match="scale"):
        hsr.relu_reported_attention(q, k, v, index, bias=0.0, scale=-1.0)
    with pytest.raises(ValueError, match="bias"):
        hsr.relu_reported_attention(q, k, v, index, bias=float("nan"))
    with pytest.raises(ValueError, match="decode"):
        hsr.relu_reported_attention(q.expand(1, 4, 2, 64), k, v, index, bias=0.0)
    sk = hsr.KeySketch.from_keys(k)
    with pytest.raises(ValueError, match="sketch"):
        hsr.relu_sketch_attention(q, k, v, hsr.KeySketch.from_keys(k[:, :, :50]), bias=0.0)
    with pytest.raises(ValueError, match="scale"):
        hsr.relu_sketch_attention(q, k, v, sk, bias=0.0, scale=0.0)
    with pytest.raises(ValueError, match="bias"):
        hsr.relu_sketch_attention(q, k, v, sk, bias=float("inf"))
    with pytest.raises(ValueError, match="index"):
        hsr.relu_sketch_attention(q, k, v, sk, bias=0.0, index=hsr.HSRIndexBatch(k[:, :, :50]))
    with pytest.raises(ValueError, match="index"):
        hsr.relu_sketch_attention(q, k, v, sk, bias=0.0, index=index.ntotal)


def relu_attend(index, sk, q, k, v, positions, tail_begin, scale, bias, alpha=2, normalize=True):
    return index._impl.relu_attend(q, sk.codes, sk.lo, sk.delta, sk.bits, sk.group, k, v, positions, tail_begin,
                                   scale, alpha, bias, normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G,n,tail,D", [(1, 97, 0, 48), (3, 1025, 30, 24), (4, 1, 5, 7)])
def test_relu_attend_is_relu_select_the_tail_and_the_kernel_in_one_call(dtype, G, n, tail, D):
    # HSRKVCache's ReLU step: the tree+sketch selection of the indexed keys [0, n), the tail
    # [n, n + tail) for every head, ReLU^2 attention over both; the selection comes back with
    # its ids mapped through the arrival positions.
    B, H = 2, 2
    q, k, v = make("clustered", B, H, G, n + tail, D, dtype, seed=7)
    index = hsr.HSRIndexBatch(k[:, :, :n].float(), keep_points=False)
    sk = hsr.KeySketch.from_keys(k[:, :, :n])
    scale = D ** -0.5
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float().repeat_interleave(G, 1)) * scale
    bias = float(torch.quantile(s.flatten(), 0.9))
    g = torch.Generator().manual_seed(8)
    positions = torch.stack([torch.randperm(n, generator=g) for _ in range(B * H)]).view(B, H, n)
    out, offsets, ids, mask, counts, read, stats, select_seconds = relu_attend(index, sk, q, k, v, positions, n,
                                                                               scale, bias)
    offsets2, ids2, mask2, kept2, stats2 = index._impl.relu_select(q[:, :, 0].float(), sk.codes, sk.lo, sk.delta,
                                                                   sk.bits, sk.group, scale, bias)
    assert torch.equal(offsets, offsets2) and torch.equal(mask, mask2) and torch.equal(stats, stats2)
    pair = torch.repeat_interleave(torch.arange(B * H), offsets2.diff())
    assert torch.equal(ids, positions.view(B * H, n)[pair, ids2])
    assert torch.equal(counts, kept2 + tail) and torch.equal(read, offsets2.diff().view(B, H) + tail)
    assert select_seconds > 0
    ref, _ = attention_ref(q.double(), k.double(), v.double(), kind="relu", alpha=2, bias=bias, scale=scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # Without positions the ids are the stored rows.
    _, _, rows, *_ = relu_attend(index, sk, q, k, v, None, n, scale, bias)
    assert torch.equal(rows, ids2)


def test_relu_attend_bad_inputs_raise():
    q, k, v = make("random", 1, 2, 2, 100, 16, torch.float32)
    index = hsr.HSRIndexBatch(k[:, :, :80], keep_points=False)
    sk = hsr.KeySketch.from_keys(k[:, :, :80])
    positions = torch.arange(80).expand(1, 2, 80).contiguous()
    ok = dict(q=q, k=k, v=v, positions=positions, tail_begin=80)
    for change, message in [
            (dict(tail_begin=79), r"tail_begin must lie in \[80 .*got 79"),
            (dict(tail_begin=101), "tail_begin"),
            (dict(q=q[:, :, 0]), r"q must be \(B, Hq, 1, D\)"),
            (dict(q=q * float("nan")), "relu_attend: q contains NaN or Inf"),
            (dict(q=q.double()), "relu_attend: .*dtype"),  # the kernel's checks name this call too
            (dict(k=k[:, :1], v=v[:, :1]), r"k must be \(1, 2, Lk, 16\) as the index"),
            (dict(positions=positions.float()), "positions"),
            (dict(positions=positions[0]), "positions")]:
        args = {**ok, **change}
        with pytest.raises(ValueError, match=message):
            relu_attend(index, sk, args["q"], args["k"], args["v"], args["positions"], args["tail_begin"], 0.25, 0.0)
    small = hsr.KeySketch.from_keys(k[:, :, :50])
    with pytest.raises(ValueError, match="codes"):
        relu_attend(index, small, q, k, v, positions, 80, 0.25, 0.0)
    with pytest.raises(ValueError, match="relu_attend: bias must be finite"):
        relu_attend(index, sk, q, k, v, positions, 80, 0.25, float("nan"))
