"""hsr.sparse_attention (CPU) against the reference over the gathered keys."""

import itertools

import pytest
import torch

import hsr
from attention_cases import DTYPES, check_against_reference, make_qkv

KINDS = [
    dict(kind="softmax"),
    dict(kind="relu", alpha=2, bias=0.3, normalize=True),
    dict(kind="relu", alpha=1, bias=0.0, normalize=False),
]


def random_selection(batch, heads_kv, group, len_k, seed, masked, empty_pair=True):
    """offsets, ids (unsorted, with repeats) and a per-head mask: none (masked False), each
    head selecting 70% of the entries (True or "dense": the kernel computes the group's heads
    together), or "disjoint": each entry selected by exactly one head, a few by none (the
    kernel runs each head over its own keys)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * len_k, (batch * heads_kv,), generator=g)
    if empty_pair:
        counts[0] = 0
    offsets = torch.zeros(batch * heads_kv + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.randint(0, len_k, (int(offsets[-1]),), generator=g)
    if masked == "disjoint":
        owner = torch.randint(0, group + 1, (ids.shape[0],), generator=g)  # group: nobody
        mask = owner.unsqueeze(1) == torch.arange(group)
    else:
        mask = torch.rand(ids.shape[0], group, generator=g) < 0.7 if masked else None
    return offsets, ids, mask


def check_rows(out, lse, q, k, v, offsets, ids, mask, kw):
    batch, heads_q = q.shape[:2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    for b, hq in itertools.product(range(batch), range(heads_q)):
        h = hq // group
        bh = b * heads_kv + h
        sel = ids[offsets[bh]:offsets[bh + 1]]
        if mask is not None:
            sel = sel[mask[offsets[bh]:offsets[bh + 1], hq % group]]
        o, l = out[b:b + 1, hq:hq + 1], lse[b:b + 1, hq:hq + 1]
        if sel.numel() == 0:
            assert (o == 0).all() and (l == float("-inf")).all()
            continue
        kk, vv = k[b, h, sel][None, None], v[b, h, sel][None, None]
        check_against_reference(o, l, q[b:b + 1, hq:hq + 1], kk, vv, **kw)


CASES = []
for n, (dtype, kw, masked) in enumerate(itertools.product(DTYPES, KINDS, [False, "dense", "disjoint"])):
    CASES.append((dtype, kw, masked, [1, 4, 8][(n + n // 3) % 3], [64, 72, 128][(n + n // 9) % 3], [1, 3][n % 2]))


@pytest.mark.parametrize("dtype,kw,masked,ratio,d,len_q", CASES)
def test_matches_reference_over_the_selected_keys(dtype, kw, masked, ratio, d, len_q):
    batch, heads_kv, len_k = 2, 2, 300
    q, k, v = make_qkv(batch, heads_kv, ratio, len_q, len_k, d, dtype, "cpu", seed=len(CASES))
    offsets, ids, mask = random_selection(batch, heads_kv, ratio, len_k, seed=d + ratio, masked=masked)
    out, lse = hsr.sparse_attention(q, k, v, offsets, ids, mask, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    check_rows(out, lse, q, k, v, offsets, ids, mask, kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selecting_every_key_in_order_is_dense_attention(dtype):
    q, k, v = make_qkv(2, 3, 4, 1, 1025, 64, dtype, "cpu")
    pairs = 2 * 3
    offsets = torch.arange(pairs + 1, dtype=torch.int64) * 1025
    ids = torch.arange(1025).repeat(pairs)
    out, lse = hsr.sparse_attention(q, k, v, offsets, ids, return_lse=True)
    dense, dense_lse = hsr.attention(q, k, v, return_lse=True)
    assert torch.equal(out, dense) and torch.equal(lse, dense_lse)


def test_a_selection_and_its_complement_merge_into_dense_attention():
    q, k, v = make_qkv(1, 2, 4, 1, 4096, 64, torch.float32, "cpu", seed=3)
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(2, 4096, generator=g) < 0.1
    parts = []
    for pick in (chosen, ~chosen):
        ids = [torch.nonzero(pick[h]).flatten() for h in range(2)]
        offsets = torch.tensor([0, len(ids[0]), len(ids[0]) + len(ids[1])], dtype=torch.int64)
        parts.append(hsr.sparse_attention(q, k, v, offsets, torch.cat(ids), return_lse=True))
    out, lse = hsr.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    dense, dense_lse = hsr.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse, atol=1e-5, rtol=1e-5)


def test_nothing_selected_anywhere():
    q, k, v = make_qkv(1, 2, 2, 1, 10, 64, torch.float32, "cpu")
    out, lse = hsr.sparse_attention(q, k, v, torch.zeros(3, dtype=torch.int64),
                                    torch.zeros(0, dtype=torch.int64), return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_bad_selections_raise():
    q, k, v = make_qkv(1, 2, 2, 1, 10, 64, torch.float32, "cpu")
    ids = torch.tensor([0, 1, 2, 3], dtype=torch.int64)
    good = torch.tensor([0, 2, 4], dtype=torch.int64)
    cases = [
        (dict(offsets=torch.tensor([0, 4], dtype=torch.int64)), "offsets"),
        (dict(offsets=good.to(torch.int32)), "offsets"),
        (dict(offsets=torch.tensor([1, 2, 4], dtype=torch.int64)), "start at 0"),
        (dict(offsets=torch.tensor([0, 3, 2], dtype=torch.int64)), "start at 0|nondecreasing"),
        (dict(offsets=torch.tensor([0, 3, 1], dtype=torch.int64), ids=ids[:1]), "nondecreasing"),
        (dict(ids=torch.tensor([0, 1, 2, 10], dtype=torch.int64)), r"\[0, Lk = 10\)"),
        (dict(ids=torch.tensor([0, -1, 2, 3], dtype=torch.int64)), r"\[0, Lk = 10\)"),
        (dict(ids=ids.float()), "ids"),
        (dict(mask=torch.ones(4, 3, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(4, 2)), "mask"),
    ]
    for change, message in cases:
        args = dict(offsets=good, ids=ids, mask=None)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            torch.ops.hsr.sparse_attention(q, k, v, args["offsets"], args["ids"], args["mask"])
    with pytest.raises(ValueError, match="offsets"):
        hsr.sparse_attention(q, k, v, torch.tensor([0, 4], dtype=torch.int64), ids)
    # The problem's own checks name the call they come from.
    with pytest.raises(ValueError, match="hsr.sparse_attention: k and v must have the same shape"):
        torch.ops.hsr.sparse_attention(q, k, v[:, :1], good, ids, None)


def test_opcheck():
    q, k, v = make_qkv(1, 2, 2, 1, 50, 64, torch.float32, "cpu")
    offsets, ids, mask = random_selection(1, 2, 2, 50, seed=0, masked=True, empty_pair=False)
    torch.library.opcheck(torch.ops.hsr.sparse_attention.default, (q, k, v, offsets, ids, mask))


def test_selection_with_tail_appends_the_rows_for_every_head():
    offsets, ids, mask = random_selection(2, 3, 4, 40, seed=5, masked="disjoint")
    new_offsets, new_ids, new_mask = torch.ops.hsr.selection_with_tail(offsets, ids, mask, 40, 43)
    tail = torch.arange(40, 43)
    for p in range(6):
        old = slice(int(offsets[p]), int(offsets[p + 1]))
        got = slice(int(new_offsets[p]), int(new_offsets[p + 1]))
        assert torch.equal(new_ids[got], torch.cat([ids[old], tail]))
        assert torch.equal(new_mask[got], torch.cat([mask[old], torch.ones(3, 4, dtype=torch.bool)]))
    # An empty tail changes nothing; the result attends like the selection plus the tail.
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.hsr.selection_with_tail(offsets, ids, mask, 7, 7),
                                                 (offsets, ids, mask)))
    q, k, v = make_qkv(2, 3, 4, 1, 43, 72, torch.float32, "cpu", seed=1)
    out, lse = hsr.sparse_attention(q, k, v, new_offsets, new_ids, new_mask, return_lse=True)
    check_rows(out, lse, q, k, v, new_offsets, new_ids, new_mask, dict(kind="softmax"))


def test_selection_positions_maps_stored_rows_and_keeps_the_tail():
    offsets = torch.tensor([0, 3, 5], dtype=torch.int64)
    ids = torch.tensor([0, 5, 7, 2, 6], dtype=torch.int64)
    table = torch.tensor([[[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]]])
    # A strided view (a growing cache's buffer) works as well as a contiguous table.
    wide = torch.zeros(1, 2, 9, 2, dtype=torch.int64)
    wide[:, :, :6, 0] = table
    for positions in (table, wide[:, :, :6, 0]):
        got = torch.ops.hsr.selection_positions(offsets, ids, positions)
        assert got.tolist() == [10, 15, 7, 22, 6]


def test_bad_selection_edits_raise_and_change_nothing():
    offsets, ids, mask = random_selection(1, 2, 2, 10, seed=0, masked="dense", empty_pair=False)
    kept = [t.clone() for t in (offsets, ids, mask)]
    with_tail = torch.ops.hsr.selection_with_tail
    for args, message in [((offsets, ids, mask, 5, 4), "range of rows"),
                          ((offsets, ids, mask, -1, 4), "range of rows"),
                          ((offsets, ids.int(), mask, 0, 1), "ids"),
                          ((offsets + 1, ids, mask, 0, 1), "rise from 0"),
                          ((offsets, ids, mask[:-1], 0, 1), "mask"),
                          ((offsets, ids, mask.float(), 0, 1), "mask")]:
        with pytest.raises(ValueError, match=message):
            with_tail(*args)
    table = torch.arange(20).view(1, 2, 10)
    for args, message in [((offsets, ids, table[0]), "positions"),
                          ((offsets, ids, table.float()), "positions"),
                          ((offsets[:-1], ids, table), "B \\* H \\+ 1"),
                          ((offsets, -ids - 1, table), "non-negative"),
                          ((offsets.flip(0), ids, table), "rise from 0")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.hsr.selection_positions(*args)
    assert all(torch.equal(a, b) for a, b in zip(kept, (offsets, ids, mask)))


def test_selection_edits_opcheck():
    offsets, ids, mask = random_selection(1, 2, 2, 10, seed=0, masked="dense", empty_pair=False)
    torch.library.opcheck(torch.ops.hsr.selection_with_tail.default, (offsets, ids, mask, 10, 12))
    torch.library.opcheck(torch.ops.hsr.selection_positions.default, (offsets, ids, torch.arange(20).view(1, 2, 10)))
