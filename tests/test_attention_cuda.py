"""CUDA-only behaviour of hsr.attention (the shared CPU/CUDA cases live in test_attention.py)."""

import pytest
import torch

import hsr
from attention_cases import DTYPES, check_against_reference, make_qkv

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("d", [32, 96, 33, 256])
def test_cuda_rejects_other_head_dims(d):
    q, k, v = make_qkv(1, 1, 1, 1, 8, d, torch.float16, "cuda")
    with pytest.raises(ValueError, match="not supported on CUDA"):
        hsr.attention(q, k, v)


def test_cuda_device_mismatch():
    q, k, v = make_qkv(1, 1, 1, 1, 8, 64, torch.float16, "cuda")
    with pytest.raises(ValueError, match="one device"):
        hsr.attention(q, k.cpu(), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_q,heads_kv,lq,lk", [(32, 8, 300, 300), (32, 8, 129, 1000), (64, 1, 1, 5000),
                                                    (128, 1, 2, 3000), (8, 8, 2, 70000)])
def test_cuda_row_tiles_and_splits(dtype, causal, heads_q, heads_kv, lq, lk):
    # Row tiles that cross query positions and GQA groups, groups wider than a tile, and a
    # long MHA decode with many key splits.
    q, k, v = make_qkv(1, heads_kv, heads_q // heads_kv, lq, lk, 128, dtype, "cuda", seed=lq + lk)
    out, lse = hsr.attention(q, k, v, causal=causal, return_lse=True)
    check_against_reference(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_cuda_agrees_with_cpu(dtype, kind):
    q, k, v = make_qkv(2, 2, 4, 3, 2049, 64, dtype, "cuda", seed=21)
    kw = dict(kind=kind, alpha=2, bias=0.2, causal=True)
    out_gpu, lse_gpu = hsr.attention(q, k, v, return_lse=True, **kw)
    out_cpu, lse_cpu = hsr.attention(q.cpu(), k.cpu(), v.cpu(), return_lse=True, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=tol, rtol=tol)
    torch.testing.assert_close(lse_gpu.cpu(), lse_cpu, atol=1e-4, rtol=1e-4)


def test_cuda_graph_capture_and_replay():
    q, k, v = make_qkv(1, 8, 4, 1, 16384, 128, torch.bfloat16, "cuda", seed=2)
    expected = hsr.attention(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hsr.attention(q, k, v)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hsr.attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, hsr.attention(q, k, v))


def test_cuda_respects_current_stream_and_device_guard():
    q, k, v = make_qkv(1, 2, 4, 1, 4096, 64, torch.float16, "cuda", seed=4)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = hsr.attention(q, k, v)
    s.synchronize()
    torch.testing.assert_close(out, hsr.attention(q, k, v), atol=0, rtol=0)
