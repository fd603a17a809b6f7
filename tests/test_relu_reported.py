"""hsr.relu_reported_attention / relu_sketch_attention: ReLU attention over the keys the HSR
index reports, or whose sketch bound passes, equals dense ReLU attention."""

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
    return hsr.relu_sketch_attention(q, k, v, hsr.KeySketch.from_keys(k), **kw)


@pytest.mark.parametrize("path", ["index", "sketch"])
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


@pytest.mark.parametrize("path", ["index", "sketch"])
def test_a_selective_bias_reads_few_keys(path):
    q, k, v = make("clustered", 1, 2, 4, 20_000, 64, torch.float32, seed=1)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(4, 1)) / 8.0
    bias = float(torch.quantile(s.flatten(), 0.995))
    out, info = run(path, q, k, v, bias=bias, alpha=2)
    torch.testing.assert_close(out, hsr.attention(q, k, v, kind="relu", bias=bias, alpha=2), atol=1e-5, rtol=1e-5)
    assert info.keys_read.max() < 0.05 * 20_000


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
