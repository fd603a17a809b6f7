"""Dense attention on the CPU: hsr.attention vs torch SDPA (decode and prefill).

    python bench/bench_dense_cpu.py --json bench/results/dense_cpu.json --plot bench/results/dense_cpu.png

Decode: B=1, 32 q / 8 kv heads, D=128, one query against Lk keys. Prefill: causal, Lq=Lk.
torch SDPA gets enable_gqa=True (no repeated K/V). Median of several runs, same threads.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import hsr
from hsr.benchmarking import environment, figure, format_table, median_ms_cpu, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_case(mode, lk, dtype, heads_q=32, heads_kv=8, d=128, iters=5):
    lq = 1 if mode == "decode" else lk
    causal = mode == "prefill"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads_q, lq, d, generator=g).to(dtype)
    k = torch.randn(1, heads_kv, lk, d, generator=g).to(dtype)
    v = torch.randn(1, heads_kv, lk, d, generator=g).to(dtype)
    t_hsr = median_ms_cpu(lambda: hsr.attention(q, k, v, causal=causal), iters=iters)
    t_sdpa = median_ms_cpu(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), iters=iters)
    kv_bytes = 2 * heads_kv * lk * d * k.element_size()
    return dict(mode=mode, len_k=lk, dtype=str(dtype).replace("torch.", ""), heads=f"{heads_q}/{heads_kv}",
                head_dim=d, hsr_ms=t_hsr, sdpa_ms=t_sdpa, hsr_over_sdpa=t_hsr / t_sdpa,
                hsr_kv_gbps=kv_bytes / t_hsr / 1e6 if mode == "decode" else None)


def plot(rows, path):
    with figure(path) as (fig, ax):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["mode"] == "decode" and r["dtype"] == dtype]
            ax.plot([r["len_k"] for r in sel], [r["hsr_ms"] for r in sel], "o-", label=f"hsr {dtype}")
            ax.plot([r["len_k"] for r in sel], [r["sdpa_ms"] for r in sel], "s--", label=f"torch SDPA {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys (Lk)")
        ax.set_ylabel("decode step, ms (median)")
        ax.set_title("CPU dense decode, B=1, 32/8 heads, D=128")
        ax.legend()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--prefill", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    rows = []
    for dtype in args.dtypes:
        for lk in args.contexts:
            rows.append(bench_case("decode", lk, DTYPES[dtype]))
            print(rows[-1], flush=True)
        for lk in args.prefill:
            rows.append(bench_case("prefill", lk, DTYPES[dtype], iters=3))
            print(rows[-1], flush=True)
    print(format_table(rows, [("mode", "mode", ""), ("len_k", "Lk", "d"), ("dtype", "dtype", ""),
                              ("hsr_ms", "hsr ms", ".2f"), ("sdpa_ms", "SDPA ms", ".2f"),
                              ("hsr_over_sdpa", "hsr/SDPA", ".2f"), ("hsr_kv_gbps", "hsr KV GB/s", ".1f")]))
    if args.json:
        write_json(args.json, {"benchmark": "dense attention, CPU", "environment": environment("cpu"),
                               "command": "python bench/bench_dense_cpu.py " + " ".join(
                                   f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                   for k, v in vars(args).items() if v and k not in ("json", "plot")),
                               "rows": rows})
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
