"""Command line: `hsr demo` (the main job) and friends."""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F


def _dense_demo_cases(device: str, quick: bool):
    # (name, batch, heads_q, heads_kv, len_q, len_k, causal); 32 q / 8 kv heads, D = 128 as
    # in a Llama-3-8B layer.
    contexts = [4096, 32768] if quick else [4096, 32768, 131072]
    cases = [(f"decode {n // 1024}k", 1, 32, 8, 1, n, False) for n in contexts]
    cases.append(("prefill 1k causal", 1, 32, 8, 1024, 1024, True))
    return cases


def _fp64_reference(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q.double().cpu(), k.double().cpu().repeat_interleave(group, 1), v.double().cpu().repeat_interleave(group, 1),
        attn_mask=(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
                   if causal else None),
    )


def run_dense_demo(device: str, dtype: torch.dtype, quick: bool) -> dict:
    import hsr
    from hsr.benchmarking import environment, format_table, median_ms_cpu, median_ms_cuda

    timer = median_ms_cuda if device == "cuda" else median_ms_cpu
    rows = []
    for name, b, hq, hkv, lq, lk, causal in _dense_demo_cases(device, quick):
        g = torch.Generator().manual_seed(lk)
        q, k, v = (torch.randn(b, h, n, 128, generator=g).to(device=device, dtype=dtype)
                   for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
        # torch SDPA's is_causal aligns the first query with the first key; with Lq == Lk
        # that is the same mask as hsr's bottom-right alignment.
        ours = hsr.attention(q, k, v, causal=causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        ref = _fp64_reference(q, k, v, causal)
        t_hsr = timer(lambda: hsr.attention(q, k, v, causal=causal))
        t_sdpa = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
        rows.append(dict(
            case=name, shape=f"B{b} H{hq}/{hkv} Lq{lq} Lk{lk} D128", hsr_ms=t_hsr, sdpa_ms=t_sdpa,
            speedup=t_sdpa / t_hsr, err_hsr=(ours.double().cpu() - ref).abs().max().item(),
            err_sdpa=(theirs.double().cpu() - ref).abs().max().item(),
            diff=(ours.double() - theirs.double()).abs().max().item(),
        ))
        print(f"  {name}: hsr {t_hsr:.2f} ms, torch SDPA {t_sdpa:.2f} ms", file=sys.stderr, flush=True)
    print()
    print(f"Dense attention, hsr vs torch SDPA on {device} ({str(dtype).replace('torch.', '')}), "
          f"{torch.get_num_threads()} CPU threads" if device == "cpu" else
          f"Dense attention, hsr vs torch SDPA on {torch.cuda.get_device_name()} ({dtype})")
    print(format_table(rows, [("case", "case", ""), ("shape", "shape", ""), ("hsr_ms", "hsr ms", ".2f"),
                              ("sdpa_ms", "SDPA ms", ".2f"), ("speedup", "SDPA/hsr", ".2f"),
                              ("err_hsr", "hsr err vs fp64", ".2e"), ("err_sdpa", "SDPA err vs fp64", ".2e"),
                              ("diff", "|hsr-SDPA|", ".2e")]))
    print("\nThe real-model demo (SmolLM2 decoding through the HSR index) is not built yet; "
          "this is the dense reference that sparse decoding is measured against.")
    return {"device": device, "dtype": str(dtype), "environment": environment(device), "rows": rows}


def _parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(table)}")
    return table[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hsr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare hsr's dense attention with torch SDPA and print a table")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument("--dtype", type=_parse_dtype, default=torch.bfloat16)
    demo.add_argument("--quick", action="store_true", help="skip the 128k-key case")
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.command == "demo":
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        result = run_dense_demo(device, args.dtype, args.quick)
        if args.json:
            from hsr.benchmarking import write_json

            write_json(args.json, result)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
