"""Command line: `hsr demo` (the main job), `hsr capture`, `hsr corpus`, `hsr dense`."""

from __future__ import annotations

import argparse
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
    print("\nThe real-model job (SmolLM2 decoding through the HSR index) is `hsr demo`.")
    return {"device": device, "dtype": str(dtype), "environment": environment(device), "rows": rows}


def _parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(table)}")
    return table[name]


def _run_demo(args) -> int:
    from hsr import demo
    from hsr.benchmarking import write_json

    result = demo.run(args)
    demo.print_report(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        demo.plot(result, args.plot)
    return 0


def _run_capture(args) -> int:
    from hsr import capture

    path = capture.capture_to_file(args.out, text=args.text, context=args.context, queries=args.queries)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hsr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: SmolLM2 decodes a long real text densely and through HSR, "
                                       "side by side (agreement, perplexity, keys read, certificates)")
    from hsr.demo import add_arguments
    add_arguments(demo)
    dense = sub.add_parser("dense", help="compare hsr's dense attention with torch SDPA and print a table")
    dense.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    dense.add_argument("--dtype", type=_parse_dtype, default=torch.bfloat16)
    dense.add_argument("--quick", action="store_true", help="skip the 128k-key case")
    dense.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    cap = sub.add_parser("capture", help="save SmolLM2's post-RoPE q/k/v of every layer for a text (real keys "
                                         "for bench/bench_index.py and bench/bench_decode_cpu.py)")
    cap.add_argument("--out", required=True, help="output file (torch.save)")
    cap.add_argument("--text", help="a UTF-8 text file (default: alice29.txt of the Canterbury corpus)")
    cap.add_argument("--context", type=int, default=8192, help="tokens of the text to run")
    cap.add_argument("--queries", type=int, default=32, help="how many of the last positions keep their queries")
    sub.add_parser("corpus", help="fetch and cache the default public-domain corpus (done by `make demo`)")
    args = parser.parse_args(argv)

    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "capture":
            return _run_capture(args)
        if args.command == "corpus":
            from hsr.realdata import ensure_corpus
            print(ensure_corpus())
            return 0
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"hsr {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "dense":
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
