"""GTA vs GQA decode on the CPU, the paper's 1B shape: step latency and bytes read.

    python bench/bench_gta.py --json bench/results/gta_cpu.json --plot bench/results/gta_cpu.png

One decode step of one attention layer at context L, batch B, bf16:
- GTA (H=1280, 20 heads, 5 query groups, 1 key head of 64, 1 latent of 128): hsr.gta_attention
  (one pass over the cache's keys and latents, then the gated per-head decoder, W_P in fp32);
  cache read per token: 64 + 128 elements;
- GQA (20 heads, 5 kv heads of 64): hsr.attention (hsr's dense decode) and torch SDPA
  (enable_gqa=True); cache read per token: 2 x 5 x 64 = 640 elements;
- MLA (DeepSeek-V2 ratios: latent 256 + shared RoPE key 32 per token), decoded absorbed:
  hsr.gta_attention with one query group per head over [c_kv, k_rope], then W_UV per head;
- for reference, GTA's latent attention alone through torch SDPA (no decoder).
The q/k/v/gate projections and W_O are not timed (the same kind of matmuls in both). Median
of several runs; the caches are random (decode cost does not depend on the values).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import hsr
from hsr.benchmarking import environment, figure, format_table, median_ms_cpu, write_json
from hsr.gta import paper_configs


def caches_for(batch, length, gta, gqa, mla, dtype):
    g = torch.Generator().manual_seed(batch)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    return dict(
        k=rand(batch, gta.num_k_heads, length, gta.head_dim), c=rand(batch, gta.num_c_groups, length, gta.latent_dim),
        kq=rand(batch, gqa.num_kv_heads, length, gqa.head_dim), vq=rand(batch, gqa.num_kv_heads, length, gqa.head_dim),
        mla=rand(batch, 1, length, mla.kv_cache_elements_per_token()))


def bench_case(batch, length, store, gta, gqa, mla, dtype, iters):
    g = torch.Generator().manual_seed(1)
    q_gta = torch.randn(batch, gta.num_q_groups, 1, gta.head_dim, generator=g).to(dtype)
    gate = torch.randn(batch, gta.num_heads, 1, gta.head_dim, generator=g).to(dtype)
    w_p = (torch.randn(gta.num_heads, gta.latent_dim, gta.head_dim, generator=g) / gta.latent_dim ** 0.5).to(dtype)
    q_gqa = torch.randn(batch, gqa.num_heads, 1, gqa.head_dim, generator=g).to(dtype)
    q_mla = torch.randn(batch, mla.num_heads, 1, mla.kv_cache_elements_per_token(), generator=g).to(dtype)
    w_uv = (torch.randn(mla.num_heads, mla.kv_rank, mla.v_head_dim, generator=g) / mla.kv_rank ** 0.5).to(dtype)
    entries = store["mla"][:, :, :length]
    k, c = store["k"][:, :, :length], store["c"][:, :, :length]
    kq, vq = store["kq"][:, :, :length], store["vq"][:, :, :length]
    t_gta = median_ms_cpu(lambda: hsr.gta_attention(q_gta, k, c, w_p, gate), iters=iters)
    t_gqa = median_ms_cpu(lambda: hsr.attention(q_gqa, kq, vq), iters=iters)
    t_sdpa = median_ms_cpu(lambda: F.scaled_dot_product_attention(q_gqa, kq, vq, enable_gqa=True), iters=iters)
    mla_scale = (mla.qk_nope_dim + mla.rope_dim) ** -0.5
    t_mla = median_ms_cpu(lambda: hsr.gta_attention(q_mla, entries, entries[..., :mla.kv_rank], w_uv,
                                                    scale=mla_scale), iters=iters)
    t_gta_sdpa = median_ms_cpu(lambda: F.scaled_dot_product_attention(q_gta, k, c, enable_gqa=True), iters=iters)
    elem = dtype.itemsize
    gta_bytes = batch * length * gta.kv_cache_elements_per_token() * elem
    gqa_bytes = batch * length * gqa.kv_cache_elements_per_token() * elem
    return dict(batch=batch, context=length, gta_ms=t_gta, gqa_hsr_ms=t_gqa, gqa_sdpa_ms=t_sdpa, mla_ms=t_mla,
                gta_sdpa_latent_ms=t_gta_sdpa, gta_over_gqa=t_gta / t_gqa, gta_over_gqa_sdpa=t_gta / t_sdpa,
                gta_bytes=gta_bytes, gqa_bytes=gqa_bytes, byte_ratio=gta_bytes / gqa_bytes,
                gta_gbps=gta_bytes / t_gta / 1e6, gqa_gbps=gqa_bytes / t_gqa / 1e6)


def plot(rows, path):
    with figure(path) as (fig, ax):
        for b in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["batch"] == b]
            ax.plot([r["context"] for r in sel], [r["gta_over_gqa"] for r in sel], "o-", label=f"B={b} vs hsr GQA")
            ax.plot([r["context"] for r in sel], [r["gta_over_gqa_sdpa"] for r in sel], "s--",
                    label=f"B={b} vs SDPA GQA")
        ax.axhline(0.3, color="gray", lw=0.8, ls=":", label="byte ratio 0.3")
        ax.axhline(0.4, color="red", lw=0.8, ls=":", label="target 0.4")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context")
        ax.set_ylabel("GTA step time / GQA step time")
        ax.set_title("CPU decode, 1B shape, bf16")
        ax.legend(fontsize=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-gqa-gib", type=float, default=4.0,
                    help="skip (batch, context) whose GQA cache exceeds this (the machine's memory)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    cfgs = paper_configs("1B")
    gta, gqa, mla = cfgs["GTA"], cfgs["GQA"], cfgs["MLA"]
    dtype = torch.bfloat16
    rows = []
    for batch in args.batches:
        fits = [n for n in args.contexts
                if batch * n * gqa.kv_cache_elements_per_token() * dtype.itemsize <= args.max_gqa_gib * 2**30]
        if not fits:
            continue
        store = caches_for(batch, max(fits), gta, gqa, mla, dtype)
        for length in fits:
            rows.append(bench_case(batch, length, store, gta, gqa, mla, dtype, args.iters))
            print(rows[-1], flush=True)
        del store
    print(format_table(rows, [
        ("batch", "B", "d"), ("context", "context", "d"), ("gta_ms", "GTA ms", ".2f"), ("gqa_hsr_ms", "GQA hsr ms", ".2f"),
        ("gqa_sdpa_ms", "GQA SDPA ms", ".2f"), ("mla_ms", "MLA ms", ".2f"), ("gta_over_gqa", "GTA/GQA hsr", ".2f"),
        ("gta_over_gqa_sdpa", "GTA/GQA SDPA", ".2f"), ("byte_ratio", "bytes ratio", ".2f"),
        ("gta_gbps", "GTA GB/s", ".1f"), ("gqa_gbps", "GQA GB/s", ".1f")]))
    if args.json:
        write_json(args.json, {"benchmark": "GTA vs GQA decode step, 1B shape, CPU", "environment": environment("cpu"),
                               "gta": vars(gta), "gqa": vars(gqa), "mla": vars(mla), "dtype": "bfloat16",
                               "rows": rows})
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
