"""hsr.HSRIndex and hsr.HSRIndexBatch against brute force."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr
from reference import gap_threshold, inner_products_ref, score_tolerance


def make_points(kind, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, d, generator=g)
    if kind == "clustered":  # Gaussian mixture: 20 tight clusters
        centers = torch.randn(20, d, generator=g) * 4
        return centers[torch.randint(0, 20, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    if kind == "duplicated":  # a handful of distinct points, each repeated many times
        base = torch.randn(5, d, generator=g)
        return base[torch.randint(0, 5, (n,), generator=g)]
    if kind == "zero":
        return torch.zeros(n, d)
    if kind == "huge":  # norms around 1e8: squares near float's range limit of precision
        return torch.randn(n, d, generator=g) * 1e8
    if kind == "lowrank":  # rank-3 points embedded in d dimensions
        return torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g)
    raise ValueError(kind)


def make_queries(x, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    q = torch.randn(m, d, generator=g)
    if x.shape[0]:  # half of the queries point at stored points, as attention queries do
        q[: m // 2] += x[torch.randint(0, x.shape[0], (m // 2,), generator=g)] / (x.norm(dim=1).max() + 1e-30) * 3
    return q


def assert_range_exact(index, x, q, quantiles):
    """For thresholds in score gaps, the reported sets equal brute force exactly."""
    s64 = inner_products_ref(x, q)
    tol = score_tolerance(x, q)
    for quantile in quantiles:
        thresh = []
        for i in range(q.shape[0]):
            t = gap_threshold(s64[i], quantile, float(tol[i]))
            thresh.append(float("inf") if t is None else t)
        th = torch.tensor(thresh, dtype=torch.float64)
        lims, D, I = index.range_search(q, th.to(torch.float32))
        assert lims.shape == (q.shape[0] + 1,) and lims[0] == 0 and lims[-1] == I.numel() == D.numel()
        for i in range(q.shape[0]):
            if math.isinf(thresh[i]):
                continue
            # The float32 threshold must sit in the same gap as the float64 one.
            t32 = float(torch.tensor(thresh[i], dtype=torch.float32))
            expect = torch.nonzero(s64[i] >= t32).flatten()
            got = I[lims[i]:lims[i + 1]]
            assert torch.equal(torch.sort(got).values, expect), f"query {i}, quantile {quantile}"
            assert torch.equal(got, torch.sort(got).values), "results are sorted by id"
            if got.numel():
                assert (D[lims[i]:lims[i + 1]].double() - s64[i, got]).abs().max() <= tol[i]


def assert_topk_exact(index, x, q, k, ids=None):
    s64 = inner_products_ref(x, q)
    tol = score_tolerance(x, q)
    D, I = index.search(q, k)
    n = x.shape[0]
    assert D.shape == (q.shape[0], k) and I.shape == (q.shape[0], k)
    kk = min(k, n)
    assert (I[:, kk:] == -1).all() and torch.isinf(D[:, kk:]).all()
    ids = torch.arange(n) if ids is None else ids
    for i in range(q.shape[0]):
        if kk == 0:
            continue
        ref = torch.sort(s64[i], descending=True).values
        assert (D[i, :kk].double() - ref[:kk]).abs().max() <= 2 * tol[i], f"query {i}"
        assert (D[i, 1:kk] <= D[i, : kk - 1]).all(), "descending"
        pos = {int(v): j for j, v in enumerate(ids)}
        got_scores = s64[i, [pos[int(v)] for v in I[i, :kk]]]
        assert (got_scores - D[i, :kk].double()).abs().max() <= tol[i]
        # Where the k-th and (k+1)-th scores are separated, the id sets are unique and equal.
        if kk < n and ref[kk - 1] - ref[kk] > 2 * tol[i]:
            expect = set(ids[torch.nonzero(s64[i] >= ref[kk - 1] - tol[i]).flatten()].tolist())
            assert set(I[i, :kk].tolist()) == expect


KINDS = ["random", "clustered", "duplicated", "zero", "huge", "lowrank"]


# scan_fraction: 1.0 sends every query through the tree, 0.0 through the scan, the default
# lets the cost model choose per query.
PATHS = {"tree": 1.0, "scan": 0.0, "routed": None}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 10_000])
def test_range_and_topk_match_brute_force(kind, n, path):
    d = 24
    x = make_points(kind, n, d)
    index = hsr.HSRIndex(d, leaf_size=16 if n <= 65 else 64)
    if PATHS[path] is not None:
        index.scan_fraction = PATHS[path]
    index.add(x)
    assert index.ntotal == n
    q = make_queries(x, 8)
    assert_range_exact(index, x, q, [0.0, 0.5, 0.9, 0.99, 1.0])
    assert_topk_exact(index, x, q, 10)


@pytest.mark.parametrize("d", [1, 3, 64, 128, 256])
def test_dimensions(d):
    x = make_points("clustered", 3000, d, seed=d)
    index = hsr.HSRIndex(d)
    index.add(x)
    q = make_queries(x, 6)
    assert_range_exact(index, x, q, [0.5, 0.999])
    assert_topk_exact(index, x, q, 5)


def test_thresholds_above_max_and_below_min():
    x = make_points("random", 5000, 16)
    index = hsr.HSRIndex(16)
    index.add(x)
    q = make_queries(x, 4)
    s = inner_products_ref(x, q)
    lims, _, _ = index.range_search(q, (s.max(dim=1).values + 1).float())
    assert lims[-1] == 0
    lims, _, I = index.range_search(q, (s.min(dim=1).values - 1).float())
    assert torch.equal(lims, torch.arange(5) * 5000)
    assert torch.equal(I[:5000], torch.arange(5000))
    lims, _, _ = index.range_search(q, float("inf"))
    assert lims[-1] == 0
    lims, _, _ = index.range_search(q, float("-inf"))
    assert lims[-1] == 4 * 5000


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_inserts_and_removals(kind):
    d = 32
    x = make_points(kind, 6000, d, seed=3)
    index = hsr.HSRIndex(d, leaf_size=32)
    index.add(x[:2000])          # bulk build
    for start in range(2000, 3000, 100):
        index.add(x[start:start + 100])  # inserts into the existing tree (leaf splits)
    for i in range(3000, 3050):
        index.add(x[i])          # one at a time
    assert index.ntotal == 3050 and index.next_id == 3050
    g = torch.Generator().manual_seed(4)
    removed = torch.randperm(3050, generator=g)[:700]
    assert index.remove_ids(removed) == 700
    assert index.remove_ids(removed[:10]) == 0  # already gone
    assert index.remove_ids(torch.tensor([-1, 10**9])) == 0
    keep = torch.ones(3050, dtype=torch.bool)
    keep[removed] = False
    ids = torch.nonzero(keep).flatten()
    assert index.ntotal == ids.numel()
    q = make_queries(x[ids], 8)
    s64 = inner_products_ref(x[ids], q)
    tol = score_tolerance(x[ids], q)
    for quantile in [0.3, 0.95]:
        th = torch.tensor([gap_threshold(s64[i], quantile, float(tol[i])) for i in range(8)], dtype=torch.float32)
        lims, _, I = index.range_search(q, th)
        for i in range(8):
            expect = ids[torch.nonzero(s64[i] >= float(th[i])).flatten()]
            assert torch.equal(I[lims[i]:lims[i + 1]], expect)
    assert_topk_exact(index, x[ids], q, 7, ids=ids)
    # Removing most points triggers a rebuild; ids stay stable.
    index.remove_ids(ids[: ids.numel() - 100])
    rest = ids[-100:]
    lims, _, I = index.range_search(q, float("-inf"))
    assert torch.equal(I[:100], rest)
    index.add(x[5000:5010])
    assert index.ntotal == 110 and index.next_id == 3060


def test_serialize_round_trip(tmp_path):
    x = make_points("clustered", 4000, 40)
    index = hsr.HSRIndex(40, leaf_size=32)
    index.add(x)
    index.remove_ids(torch.arange(0, 4000, 7))
    index.add(x[:50])
    path = tmp_path / "idx.hsr"
    hsr.write_index(index, path)
    loaded = hsr.read_index(path)
    assert (loaded.d, loaded.ntotal, loaded.next_id, loaded.leaf_size) == (40, index.ntotal, index.next_id, 32)
    q = make_queries(x, 6)
    for a, b in zip(index.range_search(q, 10.0), loaded.range_search(q, 10.0)):
        assert torch.equal(a, b)
    for a, b in zip(index.search(q, 9), loaded.search(q, 9)):
        assert torch.equal(a, b)
    loaded.add(x[100:200])  # a loaded index stays dynamic
    assert loaded.ntotal == index.ntotal + 100


def test_corrupted_or_truncated_files_are_rejected(tmp_path):
    x = make_points("random", 500, 8)
    index = hsr.HSRIndex(8, leaf_size=16)
    index.add(x)
    path = tmp_path / "idx.hsr"
    hsr.write_index(index, path)
    data = path.read_bytes()
    cases = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "one byte short": data[:-1],
        "flipped": data[:100] + bytes([data[100] ^ 0x40]) + data[101:],
        "not an index": b"hello world" * 20,
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.hsr"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="hsr index"):
            hsr.read_index(bad)


def test_numpy_in_numpy_out():
    x = make_points("random", 300, 8).numpy().astype(np.float64)
    index = hsr.HSRIndex(8)
    index.add(x)
    lims, D, I = index.range_search(x[:3], 0.0)
    assert isinstance(lims, np.ndarray) and isinstance(D, np.ndarray) and I.dtype == np.int64
    D, I = index.search(x[:3], 4)
    assert D.shape == (3, 4) and isinstance(I, np.ndarray)


def _index_state(index, q):
    return index.ntotal, index.next_id, index.search(q, 5)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda ix: ix.add(torch.randn(5, 7)), "shape"),
        (lambda ix: ix.add(torch.randn(5)), "shape"),
        (lambda ix: ix.add(torch.tensor([[float("nan")] * 8])), "NaN or Inf"),
        (lambda ix: ix.add(torch.tensor([[float("inf")] * 8])), "NaN or Inf"),
        (lambda ix: ix.add(torch.ones(3, 8, dtype=torch.int32)), "floating-point"),
        (lambda ix: ix.add("points"), "torch.Tensor or numpy"),
        (lambda ix: ix.search(torch.randn(2, 8), -1), "non-negative"),
        (lambda ix: ix.search(torch.randn(2, 9), 3), "shape"),
        (lambda ix: ix.range_search(torch.randn(2, 8), torch.zeros(3)), "one value per query"),
        (lambda ix: ix.range_search(torch.randn(2, 8), float("nan")), "NaN"),
        (lambda ix: ix.range_search(torch.full((2, 8), float("nan")), 0.0), "NaN or Inf"),
        (lambda ix: ix.remove_ids(torch.tensor([1.5])), "integers"),
    ],
)
def test_bad_input_raises_and_leaves_the_index_unchanged(call, message):
    x = make_points("random", 200, 8)
    index = hsr.HSRIndex(8, leaf_size=16)
    index.add(x)
    q = make_queries(x, 3)
    before = _index_state(index, q)
    with pytest.raises((ValueError, TypeError), match=message):
        call(index)
    after = _index_state(index, q)
    assert before[:2] == after[:2]
    assert torch.equal(before[2][0], after[2][0]) and torch.equal(before[2][1], after[2][1])


@pytest.mark.parametrize("d,leaf_size", [(0, 64), (257, 64), (8, 0), (8, -3)])
def test_bad_construction(d, leaf_size):
    with pytest.raises(ValueError):
        hsr.HSRIndex(d, leaf_size=leaf_size)


def test_the_op_level_class_validates_too():
    impl = torch.classes.hsr.Index(8, 16)
    with pytest.raises((ValueError, RuntimeError), match="float32"):
        impl.add(torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError), match="NaN or Inf"):
        impl.add(torch.full((3, 8), float("nan")))
    with pytest.raises((ValueError, RuntimeError), match="k must be >= 0"):
        impl.search(torch.zeros(1, 8), -2)
    assert impl.ntotal() == 0


def test_reset():
    index = hsr.HSRIndex(4)
    index.add(torch.randn(100, 4))
    index.reset()
    assert index.ntotal == 0 and index.next_id == 0
    lims, _, _ = index.range_search(torch.randn(2, 4), -1e9)
    assert lims[-1] == 0
    index.add(torch.randn(10, 4))
    assert index.ntotal == 10


def test_stats_report_pruning_and_scan_fallback():
    # Clustered points: a selective query scores a small part of the points.
    x = make_points("clustered", 20_000, 32)
    index = hsr.HSRIndex(32)
    index.add(x)
    q = x[:4] * 1.0
    s = inner_products_ref(x, q)
    th = torch.quantile(s, 0.999, dim=1).float()
    index.range_search(q, th)
    stats = index.last_stats
    assert stats.queries == 4 and not stats.fell_back_to_scan
    assert 0 < stats.points_scored < 0.2 * 4 * 20_000
    # A threshold that every point passes: pruning cannot pay, the index scans.
    index.range_search(q, float("-inf"))
    stats = index.last_stats
    assert stats.queries_scanned == 4 and stats.points_scored == 4 * 20_000
    # Top-k near stored points of small clusters (400 of 100 points) finishes in the tree...
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(400, 32, generator=g) * 4
    small = centers.repeat_interleave(100, 0) + 0.3 * torch.randn(40_000, 32, generator=g)
    fine = hsr.HSRIndex(32)
    fine.add(small)
    fine.search(small[::10_000] * 1.0, 10)
    stats = fine.last_stats
    assert stats.queries_scanned == 0 and stats.points_scored < 0.03 * 4 * 40_000
    # ...but on isotropic points it runs out of its budget and scans; the wasted tree work
    # stays counted.
    iso = hsr.HSRIndex(32)
    iso.add(make_points("random", 40_000, 32))
    iso.search(torch.randn(4, 32), 10)
    stats = iso.last_stats
    assert stats.queries_scanned == 4 and stats.points_scored > 4 * 40_000
    # Small indexes scan top-k queries outright.
    fine.reset()
    fine.add(small[:20_000])
    fine.search(small[:4] * 1.0, 10)
    assert fine.last_stats.queries_scanned == 4 and fine.last_stats.points_scored == 4 * 20_000


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_one_query_walk_in_parts_finishes_or_gives_up(threads):
    # With fewer queries than threads, a walk is split at a level of 16 nodes per thread and
    # the threads walk those subtrees in turn. A part whose frontier count passes the cap
    # (half the points) stops the walk: the query scans, and of the walk only its visited
    # nodes stay counted. A selective query finishes in the tree with the same answers.
    x = make_points("clustered", 30_000, 16)
    q = x[5:6] * 1.0
    index = hsr.HSRIndex(16, leaf_size=8)
    index.add(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = inner_products_ref(x, q)
        index.range_search(q, torch.quantile(s, 0.3, dim=1).float())
        stats = index.last_stats
        assert stats.queries_scanned == 1 and stats.points_scored == 30_000 and stats.points_sketched == 0
        assert stats.nodes_visited > 0
        index.range_search(q, torch.quantile(s, 0.999, dim=1).float())
        stats = index.last_stats
        assert stats.queries_scanned == 0 and 0 < stats.points_sketched < 0.5 * 30_000
        assert_range_exact(index, x, q, [0.3, 0.9, 0.999])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated"])
@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("n,d", [(10_000, 20), (1_000, 128), (97, 17), (3_001, 256)])
def test_scan_and_tree_give_identical_results(kind, m, threads, n, d):
    # 10_000 points make the scan split into pieces across threads (joined in id order), fewer
    # split the queries across threads instead; 9 queries make blocks of 4, 4 and 1;
    # duplicated points make ties at the k-th score; d = 17 and 256 exercise the kernel's
    # remainder lanes and its longest rows.
    x = make_points(kind, n, d)
    q = make_queries(x, m)
    index = hsr.HSRIndex(d)
    index.add(x)
    th = torch.quantile(inner_products_ref(x, q), 0.97, dim=1).float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for path in ("tree", "scan"):
            index.scan_fraction = PATHS[path]
            results[path] = index.range_search(q, th) + index.search(q, 25)
            assert index.last_stats.queries_scanned == (m if path == "scan" else 0)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results["tree"], results["scan"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_scan_fraction(value):
    index = hsr.HSRIndex(4)
    batch = hsr.HSRIndexBatch(batch=1, heads=1, d=4)
    for obj in (index, batch):
        with pytest.raises(ValueError, match="scan_fraction"):
            obj.scan_fraction = value
        assert obj.scan_fraction == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scan_fraction"):
        index._impl.set_scan_fraction(2.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_range_batch_shares_leaves_and_matches_queries_one_by_one(threads):
    # The tree path scores each leaf once for every query of the call that opened it; the
    # answers must be those of the queries asked one at a time: repeated queries with
    # different thresholds (one above every score, one below: every leaf "inside"), and
    # queries that open disjoint leaves.
    x = make_points("clustered", 5_000, 24)
    q = make_queries(x, 6)
    q = torch.cat([q, q[:3], q[:3]])
    s = inner_products_ref(x, q)
    th = torch.quantile(s, 0.95, dim=1).float()
    th[6:9] = torch.quantile(s[6:9], 0.5, dim=1).float()
    th[9] = float(s[9].max()) + 1.0
    th[10] = float(s[10].min()) - 1.0
    index = hsr.HSRIndex(24, leaf_size=32)
    index.add(x)
    index.scan_fraction = 1.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lims, D, I = index.range_search(q, th)
        stats = index.last_stats
        singles = []
        for i in range(q.shape[0]):
            singles.append(index.range_search(q[i:i + 1], th[i:i + 1]))
            assert index.last_stats.queries_scanned == 0
    finally:
        torch.set_num_threads(before)
    assert stats.queries_scanned == 0 and stats.results == int(lims[-1])
    assert int(lims[10 + 1] - lims[10]) == 5_000 and int(lims[9 + 1] - lims[9]) == 0
    for i, (sl, sd, si) in enumerate(singles):
        assert torch.equal(I[lims[i]:lims[i + 1]], si), i
        assert torch.equal(D[lims[i]:lims[i + 1]], sd), i
    assert_range_exact(index, x, q, [0.9, 0.999])


def test_batch_index_matches_single_indexes_with_gqa():
    B, H, n, d, group = 2, 3, 700, 16, 4
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, H, n, d, generator=g)
    batch = hsr.HSRIndexBatch(keys, leaf_size=32)
    assert torch.equal(batch.ntotal, torch.full((B, H), n))
    q = torch.randn(B, H * group, d, generator=g)
    lims, D, I = batch.range_search(q, 2.0)
    Dk, Ik = batch.search(q, 6)
    assert Dk.shape == (B, H * group, 6)
    for b in range(B):
        for hq in range(H * group):
            single = hsr.HSRIndex(d, leaf_size=32)
            single.add(keys[b, hq // group])
            i = b * H * group + hq
            # Same answers, to the bit: scans and traversals share one dot-product kernel.
            sl, sd, si = single.range_search(q[b, hq:hq + 1], 2.0)
            assert torch.equal(I[lims[i]:lims[i + 1]], si)
            assert torch.equal(D[lims[i]:lims[i + 1]], sd)
            td, ti = single.search(q[b, hq:hq + 1], 6)
            assert torch.equal(Ik[b, hq], ti[0])
            assert torch.equal(Dk[b, hq], td[0])
    more = torch.randn(B, H, 50, d, generator=g)
    batch.add(more)
    assert torch.equal(batch.ntotal, torch.full((B, H), n + 50))
    with pytest.raises(ValueError, match="multiple"):
        batch.search(torch.randn(B, 5, d), 3)
    with pytest.raises(ValueError):
        batch.add(torch.randn(B, H + 1, 3, d))


@pytest.mark.parametrize("path", ["tree", "scan"])
def test_range_union_groups_the_heads_hits(path):
    B, H, G, n, d = 2, 3, 4, 500, 12
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(B, H, n, d, generator=g)
    batch = hsr.HSRIndexBatch(keys, leaf_size=16)
    batch.scan_fraction = PATHS[path]
    q = torch.randn(B, H * G, d, generator=g)
    th = torch.full((B, H * G), 2.5)
    th[0, :G] = 1e9  # pair (0, 0): no head reports anything
    th[1, G] = -1e9  # one head of pair (1, 1) reports every key
    lims, _, I = batch.range_search(q, th)
    offsets, ids, mask, counts = batch.range_union(q, th)
    assert offsets.shape == (B * H + 1,) and mask.shape == (ids.numel(), G) and mask.dtype == torch.bool
    assert torch.equal(counts.flatten(), lims[1:] - lims[:-1])
    for p in range(B * H):
        got_ids, got_mask = ids[offsets[p]:offsets[p + 1]], mask[offsets[p]:offsets[p + 1]]
        heads = [set(I[lims[p * G + j]:lims[p * G + j + 1]].tolist()) for j in range(G)]
        assert got_ids.tolist() == sorted(set().union(*heads))
        for j in range(G):
            assert set(got_ids[got_mask[:, j]].tolist()) == heads[j]
    assert offsets[1] == 0 and offsets[5] - offsets[4] == n
    with pytest.raises(ValueError, match="multiple"):
        batch.range_union(torch.randn(B, 5, d), 0.0)


def test_paper_threshold_reports_about_n_to_the_four_fifths():
    n, d = 200_000, 64
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, d, generator=g) * 0.7 + 0.2
    stats = hsr.KeyStats.from_keys(keys)
    q = torch.randn(16, d, generator=g)
    b = hsr.paper_threshold(q, stats, n)
    counts = ((q.double() @ keys.double().T) >= b.unsqueeze(1)).sum(1).double()
    expected = n * hsr.expected_reported_fraction(n)
    # Gaussian scores: the count matches the exact tail, and stays below n^(4/5).
    assert (counts.mean() - expected).abs() < 0.1 * expected
    assert counts.max() < n ** 0.8
    with pytest.raises(ValueError):
        hsr.paper_threshold(q, stats, 1)
    centred = hsr.paper_threshold(q, 0.7, n)
    assert torch.allclose(centred, 0.7 * q.double().norm(dim=1) * math.sqrt(0.4 * math.log(n)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.integers(1, 40),
    n=st.integers(0, 400),
    leaf_size=st.integers(1, 70),
    quantile=st.floats(0.0, 1.0),
    kind=st.sampled_from(KINDS),
    inserts=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_property_exact_against_brute_force(d, n, leaf_size, quantile, kind, inserts, seed):
    x = make_points(kind, n + inserts, d, seed=seed)
    index = hsr.HSRIndex(d, leaf_size=leaf_size)
    index.add(x[:n])
    for i in range(n, n + inserts):
        index.add(x[i:i + 1])
    q = make_queries(x, 3, seed=seed + 1)
    assert_range_exact(index, x, q, [quantile])
    assert_topk_exact(index, x, q, 1 + seed % 12)


class _OneTree:
    """HSRIndexBatch with B = H = 1 seen through HSRIndex's query interface."""

    def __init__(self, batch):
        self.batch = batch

    def range_search(self, q, thresh):
        return self.batch.range_search(q.unsqueeze(0), thresh)

    def search(self, q, k):
        D, I = self.batch.search(q.unsqueeze(0), k)
        return D[0], I[0]


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated", "lowrank"])
def test_whole_leaf_adds_and_leaf_order_ids_stay_exact(kind):
    d, leaf = 37, 16
    x = make_points(kind, 500, d, seed=3)
    batch = hsr.HSRIndexBatch(x[:200].view(1, 1, 200, d), leaf_size=leaf)
    perm = batch.relabel_in_leaf_order()[0, 0]
    assert torch.equal(perm.sort().values, torch.arange(200))
    stored = x[:200][perm]  # new id j is the old id perm[j]
    for chunk in (x[200:300], x[300:301], x[301:500]):  # 6 whole leaves and one of 4; 1; 12 and 7
        batch.add_leaves(chunk.view(1, 1, -1, d))
        stored = torch.cat([stored, chunk])
        q = make_queries(stored, 8)
        assert_range_exact(_OneTree(batch), stored, q, [0.0, 0.5, 0.99, 1.0])
        assert_topk_exact(_OneTree(batch), stored, q, 10)
    perm = batch.relabel_in_leaf_order()[0, 0]
    assert torch.equal(perm.sort().values, torch.arange(500))
    stored = stored[perm]
    assert_range_exact(_OneTree(batch), stored, make_queries(stored, 8), [0.0, 0.9, 1.0])
    with pytest.raises(ValueError):
        batch.add_leaves(torch.full((1, 1, 2, d), float("nan")))
    assert int(batch.ntotal) == 500


def test_relabelled_leaves_are_runs_of_consecutive_ids():
    """After relabel_in_leaf_order (and for leaves added whole), every leaf's ids are
    consecutive: a tree-only selection is then at most one run of ids per opened leaf, while
    the same selection over a tree built on the arrival order is scattered."""
    g = torch.Generator().manual_seed(0)
    B, H, G, n, d, leaf = 1, 2, 3, 3000, 32, 16
    centers = torch.randn(B, H, 12, d, generator=g) * 2  # tight clusters: the tree prunes most
    pick = torch.randint(0, 12, (B, H, n), generator=g)
    k = centers.gather(2, pick.unsqueeze(-1).expand(-1, -1, -1, d)) + 0.05 * torch.randn(B, H, n, d, generator=g)
    v = torch.randn(B, H, n, d, generator=g)
    q = centers[:, :, :G].reshape(B, H * G, 1, d)

    def runs_and_leaves(index, keys):
        _, info = hsr.certified_attention(q, keys, v, None, eps=1e-3, index=index)
        runs = 0
        for p in range(B * H):
            ids = info.ids[info.offsets[p]:info.offsets[p + 1]].sort().values
            runs += int((ids.diff() != 1).sum()) + (1 if ids.numel() else 0)
        return runs, int(info.index_stats[1])

    plain = hsr.HSRIndexBatch(k[:, :, :2800], leaf_size=leaf)
    plain.add_leaves(k[:, :, 2800:])
    runs, leaves = runs_and_leaves(plain, k)
    assert runs > 2 * leaves  # arrival order: a leaf's keys are scattered
    ordered = hsr.HSRIndexBatch(k[:, :, :2800], leaf_size=leaf)
    perm = ordered.relabel_in_leaf_order()
    ordered.add_leaves(k[:, :, 2800:])
    stored = torch.cat([k[:, :, :2800].gather(2, perm.unsqueeze(-1).expand(-1, -1, -1, d)), k[:, :, 2800:]], 2)
    runs, leaves = runs_and_leaves(ordered, stored)
    assert 0 < runs <= leaves


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_batch_index_takes_half_keys_as_their_float32_values(dtype):
    # Each tree converts its own keys: the same trees as from a float32 copy, bit for bit. The
    # keys are a narrowed view of a larger buffer (as a cache passes them), read in place.
    B, H, n, d, leaf = 2, 3, 1025, 97, 16
    g = torch.Generator().manual_seed(4)
    keys = (torch.randn(B, H, n + 100, d, generator=g) * 3).to(dtype)[:, :, :n]
    half, full = hsr.HSRIndexBatch(keys[:, :, :900], leaf_size=leaf), hsr.HSRIndexBatch(
        keys[:, :, :900].float(), leaf_size=leaf)
    half.add_leaves(keys[:, :, 900:])
    full.add_leaves(keys[:, :, 900:].float())
    q = torch.randn(B, 2 * H, d, generator=g)
    for got, want in zip(half.range_search(q, 5.0) + half.search(q, 7),
                         full.range_search(q, 5.0) + full.search(q, 7)):
        assert torch.equal(got, want)
    assert torch.equal(half.relabel_in_leaf_order(), full.relabel_in_leaf_order())
    strided = hsr.HSRIndexBatch(keys[:, :, :900].transpose(2, 3).contiguous().transpose(2, 3), leaf_size=leaf)
    assert torch.equal(strided.relabel_in_leaf_order(), hsr.HSRIndexBatch(
        keys[:, :, :900].float(), leaf_size=leaf).relabel_in_leaf_order())
    bad = keys[:, :, :4].clone()
    bad[1, 2, 3, 96] = float("nan")
    with pytest.raises(ValueError, match="HSRIndexBatch.add_leaves: keys contains NaN or Inf"):
        half.add_leaves(bad)
    assert torch.equal(half.ntotal, torch.full((B, H), n))
    with pytest.raises(ValueError, match=r"keys has dimension 96 but the index has d=97"):
        half.add_leaves(keys[..., :96])


def test_relabel_needs_trees_of_one_size():
    batch = hsr.HSRIndexBatch(batch=1, heads=2, d=4, leaf_size=4)
    assert batch.relabel_in_leaf_order().shape == (1, 2, 0)
    batch._impl.add(torch.randn(1, 2, 10, 4))
    assert batch.relabel_in_leaf_order().shape == (1, 2, 10)


def test_scan_path_sees_points_added_after_a_query():
    """The scan's id-ordered copy grows with adds (and is dropped on removals)."""
    d = 12
    x = make_points("random", 900, d, seed=5)
    index = hsr.HSRIndex(d, leaf_size=16)
    index.scan_fraction = 0.0
    index.add(x[:300])
    assert_range_exact(index, x[:300], make_queries(x[:300], 4), [0.5])
    index.add(x[300:320])                       # inserted one by one
    index.add(x[320:700])                       # a rebuild
    q = make_queries(x[:700], 6)
    assert_range_exact(index, x[:700], q, [0.0, 0.5, 1.0])
    assert_topk_exact(index, x[:700], q, 7)
    index.remove_ids(torch.arange(0, 700, 3))
    keep = torch.tensor([i for i in range(700) if i % 3])
    index.add(x[700:])
    ids = torch.cat([keep, torch.arange(700, 900)])
    assert_topk_exact(index, x[ids], make_queries(x[ids], 6), 5, ids=ids)
    batch = hsr.HSRIndexBatch(x[:200].view(1, 1, 200, d), leaf_size=16)
    batch.scan_fraction = 0.0
    _OneTree(batch).search(make_queries(x[:200], 2), 3)
    batch.add_leaves(x[200:260].view(1, 1, 60, d))
    assert_topk_exact(_OneTree(batch), x[:260], make_queries(x[:260], 6), 5)
    perm = batch.relabel_in_leaf_order()[0, 0]
    assert_topk_exact(_OneTree(batch), x[:260][perm], make_queries(x[:260], 6), 5)


def test_bounds_only_index_selects_like_the_full_one_and_refuses_point_queries():
    g = torch.Generator().manual_seed(2)
    B, H, G, n, d = 1, 2, 2, 600, 16
    k = torch.randn(B, H, n, d, generator=g)
    v = torch.randn(B, H, n, d, generator=g)
    q = torch.randn(B, H * G, 1, d, generator=g) * 2
    full = hsr.HSRIndexBatch(k[:, :, :500], leaf_size=16)
    lean = hsr.HSRIndexBatch(k[:, :, :500], leaf_size=16, keep_points=False)
    assert full.keeps_points and not lean.keeps_points
    for index in (full, lean):
        index.relabel_in_leaf_order()
        index.add_leaves(k[:, :, 500:])
    # The same trees: the same certified selection, bit for bit.
    sketch = hsr.KeySketch.from_keys(k)
    out_a, a = hsr.certified_attention(q, k, v, sketch, eps=1e-2, index=full)
    out_b, b = hsr.certified_attention(q, k, v, sketch, eps=1e-2, index=lean)
    assert torch.equal(out_a, out_b) and int(a.index_stats[1]) > 0
    for name in ("mass_bound", "offsets", "ids", "mask", "index_stats"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert lean.nbytes < full.nbytes - B * H * n * d * 4 * 0.9  # no float32 copy of the keys
    for call in (lambda: lean.search(q[:, :, 0], 3), lambda: lean.range_search(q[:, :, 0], 0.0),
                 lambda: lean.add(k[:, :, :10])):
        with pytest.raises(ValueError, match="keep_points"):
            call()
    assert torch.equal(lean.ntotal, torch.full((B, H), n))
    with pytest.raises(ValueError, match="keep_points"):
        hsr.HSRIndexBatch(batch=1, heads=1, d=4, keep_points=1)


@pytest.mark.parametrize("kind", ["clustered", "random", "huge", "lowrank", "duplicated"])
@pytest.mark.parametrize("d", [7, 48, 128])
@pytest.mark.parametrize("updated", [False, True])
def test_range_threshold_at_a_reported_score(kind, d, updated):
    """The key sketch only decides which points get a float score: at a threshold equal to a
    point's reported score that point is still reported, one float step above it is not, and
    the sets match the scores of a query that reports everything, bit for bit."""
    x = make_points(kind, 3000, d, seed=d)
    index = hsr.HSRIndex(d, leaf_size=32)
    index.scan_fraction = 1.0
    index.add(x)
    if updated:  # points inserted into leaves whose centroids they are far from, slots moved by removals
        index.add(make_points("random", 400, d, seed=d + 1) * 3 + 5)
        index.remove_ids(torch.arange(0, 3400, 7))
    q = make_queries(x, 4)
    lims, D, I = index.range_search(q, float("-inf"))
    sketched = 0
    for i in range(q.shape[0]):
        scores, ids = D[lims[i]:lims[i + 1]], I[lims[i]:lims[i + 1]]
        order = torch.argsort(scores, descending=True)
        for rank in [0, 1, len(order) // 100, len(order) // 2]:
            s = scores[order[rank]]
            # Hits come sorted by id, so the expected hits are these in place.
            for th, passes in [(s, scores >= s), (torch.nextafter(s, torch.tensor(math.inf)), scores > s)]:
                _, D2, I2 = index.range_search(q[i:i + 1], th.reshape(1))
                assert torch.equal(I2, ids[passes]), (i, rank, float(th))
                assert torch.equal(D2, scores[passes])
                sketched += index.last_stats.points_sketched
    assert sketched > 0, "the sketch was never consulted"


@pytest.mark.parametrize("d", [32, 40, 128])
def test_range_sketch_bound_at_its_worst(d):
    """Two points o and -o in one leaf (centroid 0, so the sketch quantizes o itself), every
    coordinate of o nearly half a quantization step above its level in the direction of q:
    the sketch under-estimates <q, o> by almost its full radius, and o must still be found at
    a threshold equal to its score."""
    g = torch.Generator().manual_seed(d)
    step = 1.0 / 256
    o = torch.empty(d)
    q = torch.ones(d)
    for first in range(0, d, 32):
        size = min(32, d - first)
        o[first] = 0.0  # the group's lowest value and, 255 steps up, its highest
        o[first + 1] = 255 * step
        levels = torch.randint(0, 254, (size - 2,), generator=g).double()
        o[first + 2:first + size] = ((levels + 0.49) * step).float()
        q[first:first + 2] = 0.0  # the two exact coordinates carry no error
    index = hsr.HSRIndex(d, leaf_size=2)
    index.scan_fraction = 1.0
    index.add(torch.stack([o, -o]))
    _, D, I = index.range_search(q[None], float("-inf"))
    score = D[I == 0]
    _, D2, I2 = index.range_search(q[None], score)
    assert I2.tolist() == [0] and torch.equal(D2, score)
    assert index.last_stats.points_sketched == 2 and index.last_stats.points_scored == 1
