import pytest
import torch
import torch.nn.functional as F

import hsr
from attention_cases import DTYPES, check_against_reference, make_qkv, shape_cases

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CUDA_HEAD_DIMS = (64, 128)


def skip_unsupported(device, d):
    if device == "cuda" and d not in CUDA_HEAD_DIMS:
        pytest.skip(f"head_dim {d} has no CUDA kernel (tested to raise in test_cuda_rejects_other_head_dims)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lq,lk,d,ratio,dtype,causal", shape_cases([64, 128, 33]))
def test_softmax_matches_reference(device, lq, lk, d, ratio, dtype, causal):
    skip_unsupported(device, d)
    q, k, v = make_qkv(1, 2, ratio, lq, lk, d, dtype, device, seed=lq * 7919 + lk)
    out, lse = hsr.attention(q, k, v, causal=causal, return_lse=True)
    check_against_reference(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 128, 33])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_head_dims_and_gqa(device, d, ratio, dtype):
    skip_unsupported(device, d)
    q, k, v = make_qkv(2, 2, ratio, 5, 300, d, dtype, device, seed=d + ratio)
    out, lse = hsr.attention(q, k, v, return_lse=True)
    check_against_reference(out, lse, q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,dv", [(64, 128), (64, 64), (33, 97), (128, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lk", [1, 97, 5000])
def test_value_width_differs_from_head_dim(device, d, dv, dtype, lk):
    # GTA attends with 64-wide keys over 128-wide value latents (DESIGN 1).
    if device == "cuda" and (d, dv) not in ((64, 64), (128, 128), (64, 128)):
        pytest.skip("no CUDA kernel for this (head_dim, value width)")
    q, k, v = make_qkv(2, 2, 4, 3, lk, d, dtype, device, seed=d + dv + lk, dv=dv)
    for causal in (False, True):
        out, lse = hsr.attention(q, k, v, causal=causal, return_lse=True)
        check_against_reference(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(device, dtype, causal):
    # Lq == Lk so torch's top-left causal mask equals the bottom-right one.
    q, k, v = make_qkv(2, 2, 4, 64, 64, 64, dtype, device, seed=3)
    ours = hsr.attention(q, k, v, causal=causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_relu_matches_reference(device, alpha, normalize, dtype, causal):
    q, k, v = make_qkv(1, 2, 4, 7, 1025, 64, dtype, device, seed=alpha)
    kw = dict(kind="relu", alpha=alpha, bias=0.5, normalize=normalize, causal=causal)
    out, lse = hsr.attention(q, k, v, return_lse=True, **kw)
    check_against_reference(out, lse, q, k, v, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_bias_zeroing_rows_gives_zero_not_nan(device, normalize, dtype):
    q, k, v = make_qkv(1, 2, 4, 97, 97, 64, dtype, device, seed=11)
    # A bias far above every score: A is all zero in every row.
    kw = dict(kind="relu", alpha=2, bias=1e4, normalize=normalize)
    out, lse = hsr.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == float("-inf")).all()
    # A bias that zeroes some rows only: rows of q that are all zero score 0 < bias.
    q2 = q.clone()
    q2[:, :, ::2] = 0
    out2, lse2 = hsr.attention(q2, k, v, kind="relu", alpha=2, bias=0.1, normalize=normalize, return_lse=True)
    assert torch.equal(out2[:, :, ::2], torch.zeros_like(out2[:, :, ::2]))
    assert (lse2[:, :, ::2] == float("-inf")).all()
    check_against_reference(out2, lse2, q2, k, v, kind="relu", alpha=2, bias=0.1, normalize=normalize)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_rows_without_keys_are_zero(device, dtype):
    # Lq > Lk: the first Lq - Lk queries see no key under bottom-right alignment.
    q, k, v = make_qkv(1, 1, 1, 9, 4, 64, dtype, device, seed=5)
    out, lse = hsr.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (lse[:, :, :5] == float("-inf")).all()
    check_against_reference(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_argument(device):
    q, k, v = make_qkv(1, 2, 2, 3, 50, 64, torch.float32, device)
    out, lse = hsr.attention(q, k, v, scale=0.3, return_lse=True)
    check_against_reference(out, lse, q, k, v, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_large_scores_are_stable(device):
    # Scores in the thousands: the online softmax must not overflow.
    q, k, v = make_qkv(1, 2, 4, 4, 2000, 64, torch.float32, device, spread=8.0)
    out, lse = hsr.attention(q, k, v, scale=1.0, return_lse=True)
    check_against_reference(out, lse, q, k, v, scale=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq", [1, 3])
def test_long_context_decode_uses_key_splits(device, causal, lq):
    # B * Hkv = 1 with 20k keys: the plan splits the keys and merges partial states.
    q, k, v = make_qkv(1, 1, 8, lq, 20000, 128, torch.bfloat16, device, seed=9)
    out, lse = hsr.attention(q, k, v, causal=causal, return_lse=True)
    check_against_reference(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "strided_d", "expanded_kv", "unaligned_offset"])
def test_non_contiguous_inputs(device, layout):
    g = torch.Generator().manual_seed(0)

    def base(*shape):  # the storage is made on the device, the layout is a view of it there
        return torch.randn(*shape, generator=g).to(device)

    if layout == "bshd":  # (B, L, H, D) storage viewed as (B, H, L, D), as a model produces it
        q = base(2, 7, 8, 64).transpose(1, 2)
        k = base(2, 300, 2, 64).transpose(1, 2)
        v = base(2, 300, 2, 64).transpose(1, 2)
    elif layout == "strided_d":  # last dimension not contiguous
        q = base(2, 8, 7, 128)[..., ::2]
        k = base(2, 2, 300, 128)[..., ::2]
        v = base(2, 2, 300, 128)[..., 1::2]
    elif layout == "expanded_kv":  # a broadcast kv head dimension (stride 0)
        q = base(2, 8, 7, 64)
        k = base(2, 1, 300, 64).expand(2, 2, 300, 64)
        v = base(2, 1, 300, 64).expand(2, 2, 300, 64)
    else:  # views starting one element into their storage: rows not 16-byte aligned
        q = base(2 * 8 * 7 * 64 + 1)[1:].view(2, 8, 7, 64)
        k = base(2 * 2 * 300 * 64 + 1)[1:].view(2, 2, 300, 64)
        v = base(2 * 2 * 300 * 64 + 1)[1:].view(2, 2, 300, 64)
        assert k.data_ptr() % 16 != 0
    if layout != "unaligned_offset":
        assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    out, lse = hsr.attention(q, k, v, causal=True, return_lse=True)
    check_against_reference(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("shape_q,shape_k", [((0, 4, 3, 64), (0, 2, 5, 64)), ((2, 4, 0, 64), (2, 2, 5, 64)),
                                             ((2, 0, 3, 64), (2, 2, 5, 64))])
def test_empty_outputs(shape_q, shape_k):
    q, k = torch.randn(shape_q), torch.randn(shape_k)
    out, lse = hsr.attention(q, k, k.clone(), return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3]


def _qkv(dtype=torch.float32):
    return torch.randn(1, 4, 3, 64, dtype=dtype), torch.randn(1, 2, 5, 64, dtype=dtype), torch.randn(1, 2, 5, 64, dtype=dtype)


BAD_INPUTS = [
    ("q must be 4-D", lambda q, k, v: (q[0], k, v), {}),
    ("k must be 4-D", lambda q, k, v: (q, k[0], v), {}),
    ("must hold the same number of keys", lambda q, k, v: (q, k, v[:, :, :4]), {}),
    ("k and v must have the same shape but for the last dimension", lambda q, k, v: (q, k, v[:, :1]), {}),
    ("value width", lambda q, k, v: (q, k, v[..., :0]), {}),
    ("batch", lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), {}),
    ("head_dim", lambda q, k, v: (q[..., :32], k, v), {}),
    ("must be a multiple of the number of kv heads", lambda q, k, v: (q[:, :3], k, v), {}),
    ("at least one key", lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}),
    ("share one dtype", lambda q, k, v: (q, k.double(), v), {}),
    ("float32, float16 or bfloat16", lambda q, k, v: (q.double(), k.double(), v.double()), {}),
    ("float32, float16 or bfloat16", lambda q, k, v: (q.int(), k.int(), v.int()), {}),
    ("kind must be", lambda q, k, v: (q, k, v), {"kind": "sigmoid"}),
    ("alpha must be a positive integer", lambda q, k, v: (q, k, v), {"kind": "relu", "alpha": 0}),
    ("bias must be finite", lambda q, k, v: (q, k, v), {"kind": "relu", "bias": float("nan")}),
    ("scale must be finite", lambda q, k, v: (q, k, v), {"scale": float("inf")}),
]


@pytest.mark.parametrize("message,make,kwargs", BAD_INPUTS, ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_clear_errors(message, make, kwargs):
    q, k, v = make(*_qkv())
    with pytest.raises((ValueError, RuntimeError), match=message):
        hsr.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("message,make,kwargs", BAD_INPUTS, ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_rejected_by_the_op_itself(message, make, kwargs):
    # torch.ops.hsr.attention without the Python wrapper: the C++ checks must say the same.
    q, k, v = make(*_qkv())
    args = dict(kind="softmax", scale=None, alpha=1, bias=0.0)
    args.update(kwargs)
    with pytest.raises((ValueError, RuntimeError), match=message):
        torch.ops.hsr.attention(q, k, v, args["kind"], args["scale"], args["alpha"], args["bias"], True, False)


def test_device_mismatch_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        hsr.attention(q, k.to("meta"), v)


def test_alpha_must_be_an_int():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="alpha"):
        hsr.attention(q, k, v, kind="relu", alpha=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_opcheck(device, dtype, kind):
    q, k, v = make_qkv(1, 2, 2, 3, 40, 64, dtype, device)
    torch.library.opcheck(torch.ops.hsr.attention.default, (q, k, v), {"kind": kind, "causal": True})


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v = make_qkv(1, 2, 2, 3, 40, 64, torch.float32, device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v):
        return hsr.attention(q, k, v, causal=True) * 2

    torch.testing.assert_close(f(q, k, v), hsr.attention(q, k, v, causal=True) * 2)
