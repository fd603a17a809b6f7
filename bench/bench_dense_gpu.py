"""Dense decode on the GPU: hsr.attention vs FlashAttention-2 (torch SDPA pinned to
SDPBackend.FLASH_ATTENTION) and cuDNN (SDPBackend.CUDNN_ATTENTION).

    python bench/bench_dense_gpu.py --json bench/results/dense_gpu.json --plot bench/results/dense_gpu.png

Shapes: 32 q / 8 kv heads, D=128, bf16, batch 1/8/32, context 8k..128k, one query per
sequence. CUDA graphs, L2 flushed before every iteration, medians. Bandwidth counts the K and
V bytes a dense decode must read. SDPA gets K/V with the kv heads repeated for the backends
that reject GQA; that copy is done once, outside the timed region.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hsr
from hsr.benchmarking import environment, figure, format_table, median_ms_cuda, write_json


def sdpa_timer(backend, q, k, v):
    """Median ms of SDPA pinned to `backend`, with native GQA if the backend takes it, else
    with the kv heads repeated (the copy is made once, outside the timed region)."""
    group = q.shape[1] // k.shape[1]
    attempts = [(k, v, True)] + ([(k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False)]
                                 if group > 1 else [])
    note = None
    for kk, vv, gqa in attempts:
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

        try:
            run()
            torch.cuda.synchronize()
        except RuntimeError as exc:  # backend unavailable for this shape/option
            note = f"{backend.name}: {str(exc).splitlines()[0][:120]}"
            continue
        return median_ms_cuda(run), (None if gqa else f"{backend.name}: kv heads repeated (no native GQA)")
    return None, note


def bench_case(batch, lk, heads_q=32, heads_kv=8, d=128, dtype=torch.bfloat16):
    q = torch.randn(batch, heads_q, 1, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, heads_kv, lk, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, heads_kv, lk, d, device="cuda", dtype=dtype)
    out = hsr.attention(q, k, v)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    err = (out.float() - ref).abs().max().item()
    t_hsr = median_ms_cuda(lambda: hsr.attention(q, k, v))
    t_fa, fa_note = sdpa_timer(SDPBackend.FLASH_ATTENTION, q, k, v)
    t_cudnn, cudnn_note = sdpa_timer(SDPBackend.CUDNN_ATTENTION, q, k, v)
    kv_bytes = 2 * batch * heads_kv * lk * d * k.element_size()
    return dict(batch=batch, len_k=lk, heads=f"{heads_q}/{heads_kv}", head_dim=d, dtype="bfloat16",
                hsr_ms=t_hsr, flash_ms=t_fa, cudnn_ms=t_cudnn,
                hsr_over_flash=t_hsr / t_fa if t_fa else None,
                hsr_gbps=kv_bytes / t_hsr / 1e6, flash_gbps=kv_bytes / t_fa / 1e6 if t_fa else None,
                max_abs_err_vs_fp32=err, notes="; ".join(n for n in (fa_note, cudnn_note) if n) or None)


def plot(rows, path):
    with figure(path) as (fig, ax):
        for batch in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["batch"] == batch]
            ax.plot([r["len_k"] for r in sel], [r["hsr_gbps"] for r in sel], "o-", label=f"hsr B={batch}")
            ax.plot([r["len_k"] for r in sel], [r["flash_gbps"] or float("nan") for r in sel], "s--",
                    label=f"FA2 (SDPA) B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys (Lk)")
        ax.set_ylabel("K+V bytes / step time, GB/s")
        ax.set_title(f"dense decode, {rows[0]['heads']} heads, D=128, bf16")
        ax.legend(fontsize=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dense_gpu.py needs a CUDA device")
    if not hsr.built_with_cuda:
        raise SystemExit("hsr was built without CUDA kernels")

    rows = []
    for batch in args.batches:
        for lk in args.contexts:
            # K+V, plus a 4x repeated copy if a backend lacks native GQA, must fit in memory.
            if 5 * batch * lk * 8 * 128 * 2 * 2 > 0.8 * torch.cuda.get_device_properties(0).total_memory:
                print(f"skipping B={batch} Lk={lk}: does not fit", flush=True)
                continue
            rows.append(bench_case(batch, lk))
            print(rows[-1], flush=True)
    print(format_table(rows, [("batch", "B", "d"), ("len_k", "Lk", "d"), ("hsr_ms", "hsr ms", ".3f"),
                              ("flash_ms", "FA2 ms", ".3f"), ("cudnn_ms", "cuDNN ms", ".3f"),
                              ("hsr_over_flash", "hsr/FA2", ".2f"), ("hsr_gbps", "hsr GB/s", ".0f"),
                              ("flash_gbps", "FA2 GB/s", ".0f")]))
    env = environment("cuda")
    if args.json:
        write_json(args.json, {"benchmark": "dense decode, GPU", "environment": env,
                               "command": "python bench/bench_dense_gpu.py", "rows": rows})
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
