"""The main job: SmolLM2 decodes a long real text densely and through HSR, side by side.

    hsr demo [--context 8000] [--steps 128] [--eps 1e-3] [--text FILE] [--json out.json] [--plot out.png]

The text's first `context` tokens are prefilled once, densely (in chunks, with a progress
bar); the same keys and values then fill a dense cache and an HSR cache (every layer's keys
indexed and sketched). The next `steps` tokens of the text are fed to both, teacher-forced:
for each the next-token prediction of the two runs is compared (agreement), and the
log-likelihood of the true next token gives the continuation's perplexity under each. The HSR
run reports per layer and kv head the fraction of keys read in full precision and per q head
the certified mass_bound (the total-variation distance of its attention from dense, at most
eps under hsr.Softmax(eps)).
"""

from __future__ import annotations

import math
import sys
import time

import torch

_RELU_REJECTED = ("--policy relu: SmolLM2 was trained with softmax attention; ReLU^alpha attention computes a "
                  "different function, so its outputs would be meaningless for this model. HSR's ReLU policy is "
                  "exact for models trained with ReLU attention; for this model use softmax (certified) or topk.")


def make_policy(name: str, eps: float, topk: int):
    import hsr
    if name == "relu":
        raise ValueError(_RELU_REJECTED)
    if name == "topk":
        return hsr.TopK(topk)
    if name == "softmax":
        return hsr.Softmax(eps=eps)
    raise ValueError(f"unknown policy {name!r}; choose softmax or topk")


def _progress(iterable, desc, total=None):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


def prefill_dense(model, ids: torch.Tensor, chunk: int):
    """Dense chunked prefill of ids (1, L): the filled DynamicCache and the last logits."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    logits = None
    starts = range(0, ids.shape[1], chunk)
    with torch.no_grad():
        for s in _progress(starts, "prefill", total=len(starts)):
            out = model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
    return cache, logits


def _step(model, token, cache):
    with torch.no_grad():
        return model(token, past_key_values=cache, use_cache=True).logits[:, -1].double()


def teacher_forced(model, ids: torch.Tensor, context: int, steps: int, dense_cache, hsr_cache):
    """Feeds ids[context : context+steps] to both caches; returns per-step rows."""
    import hsr.integrations.transformers as htf
    rows = []
    for t in _progress(range(steps), "decode"):
        token = ids[:, context + t:context + t + 1]
        target = ids[0, context + t + 1].item()
        before = htf.attention_seconds(model)
        t0 = time.perf_counter()
        ld = _step(model, token, dense_cache)
        t1 = time.perf_counter()
        lh = _step(model, token, hsr_cache)
        t2 = time.perf_counter()
        after = htf.attention_seconds(model)
        rows.append(dict(
            agree=bool(ld.argmax(-1).item() == lh.argmax(-1).item()),
            nll_dense=-torch.log_softmax(ld, -1)[0, target].item(),
            nll_hsr=-torch.log_softmax(lh, -1)[0, target].item(),
            logit_diff=(ld - lh).abs().max().item(),
            step_ms_dense=(t1 - t0) * 1e3, step_ms_hsr=(t2 - t1) * 1e3,
            attn_ms_dense=(after["dense"] - before["dense"]) * 1e3,
            attn_ms_hsr=(after["hsr"] - before["hsr"]) * 1e3))
    return rows


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def summarize(rows, stats, config: dict) -> dict:
    n = len(rows)
    nll_d = sum(r["nll_dense"] for r in rows) / n
    nll_h = sum(r["nll_hsr"] for r in rows) / n
    per_layer = stats["per_layer"]
    return dict(
        **config,
        next_token_agreement=sum(r["agree"] for r in rows) / n,
        ppl_dense=math.exp(nll_d), ppl_hsr=math.exp(nll_h),
        ppl_rel_diff=math.exp(nll_h - nll_d) - 1.0,
        max_logit_diff=max(r["logit_diff"] for r in rows),
        mass_bound_max=stats["mass_bound_max"],
        mass_bound_mean=sum(p["mass_bound_mean"] for p in per_layer) / len(per_layer),
        keys_read_fraction=stats["keys_read_fraction"],
        dense_steps=sum(p["dense_steps"] for p in per_layer),
        attention_ms_per_step_dense=_median([r["attn_ms_dense"] for r in rows]),
        attention_ms_per_step_hsr=_median([r["attn_ms_hsr"] for r in rows]),
        step_ms_dense=_median([r["step_ms_dense"] for r in rows]),
        step_ms_hsr=_median([r["step_ms_hsr"] for r in rows]),
        per_layer=per_layer, steps_detail=rows)


def print_report(result: dict) -> None:
    from .benchmarking import format_table
    print(f"\nSmolLM2-135M-Instruct, {result['context']} tokens of {result['text']} prefilled, "
          f"{result['steps']} teacher-forced steps, policy {result['policy']}, {result['machine']}")
    summary = [
        ("next-token agreement with dense", f"{100 * result['next_token_agreement']:.2f} %"),
        ("perplexity dense / hsr", f"{result['ppl_dense']:.4f} / {result['ppl_hsr']:.4f} "
                                   f"({100 * result['ppl_rel_diff']:+.3f} %)"),
        ("max |logit difference|", f"{result['max_logit_diff']:.2e}"),
        ("mass_bound max / mean", f"{result['mass_bound_max']:.2e} / {result['mass_bound_mean']:.2e}"),
        ("keys read in full precision", f"{100 * result['keys_read_fraction']:.1f} % (mean over layers, kv heads, "
                                        f"steps; {result['dense_steps']} layer-steps read densely)"),
        ("attention ms per step dense / hsr", f"{result['attention_ms_per_step_dense']:.1f} / "
                                              f"{result['attention_ms_per_step_hsr']:.1f} (all 30 layers, median)"),
        ("model step ms dense / hsr", f"{result['step_ms_dense']:.1f} / {result['step_ms_hsr']:.1f}"),
    ]
    width = max(len(k) for k, _ in summary)
    for k, v in summary:
        print(f"  {k:<{width}}  {v}")
    rows = [dict(layer=p["layer"], read=100 * p["keys_read_fraction"],
                 heads=" ".join(f"{100 * x:.0f}" for x in p["keys_read_fraction_per_head"]),
                 mass=p["mass_bound_max"], ms=1e3 * p["seconds"] / max(1, p["steps"]),
                 select_ms=1e3 * p["select_seconds"] / max(1, p["steps"]),
                 attend_ms=1e3 * p["attend_seconds"] / max(1, p["steps"]))
            for p in result["per_layer"] if p["steps"]]
    print()
    print(format_table(rows, [("layer", "layer", ""), ("read", "keys read %", ".1f"),
                              ("heads", "per kv head %", ""), ("mass", "mass_bound max", ".2e"),
                              ("ms", "ms/step", ".2f"), ("select_ms", "select", ".2f"),
                              ("attend_ms", "attend", ".2f")]))


def plot(result: dict, path: str) -> None:
    from .benchmarking import figure

    layers = [p for p in result["per_layer"] if p["steps"]]
    grid = torch.tensor([p["keys_read_fraction_per_head"] for p in layers]).T
    with figure(path, dpi=110, ncols=2, figsize=(13, 4.2)) as (fig, (a, b)):
        im = a.imshow(100 * grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
        a.set_xlabel("layer")
        a.set_ylabel("kv head")
        a.set_yticks(range(grid.shape[0]))
        a.set_title("keys read in full precision (%)")
        fig.colorbar(im, ax=a)
        b.semilogy([max(r, 1e-12) for r in result["mass_bound_per_step"]], label="max over layers and heads")
        b.axhline(result["eps"], color="k", ls=":", label="eps")
        b.set_xlabel("decode step")
        b.set_ylabel("certified mass_bound (TV)")
        b.set_ylim(top=2 * result["eps"])
        b.legend(loc="lower right")
        b.set_title(f"SmolLM2, {result['context']} tokens, eps={result['eps']:g}")


def run(args) -> dict:
    import hsr
    import hsr.integrations.transformers as htf
    from .benchmarking import environment
    from .realdata import DEFAULT_TEXT, load_smollm2, read_text

    policy = make_policy(args.policy, args.eps, args.topk)
    torch.manual_seed(0)
    print("loading SmolLM2-135M-Instruct (GGUF, offline) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_smollm2()
    limit = model.config.max_position_embeddings
    if args.context < 1 or args.steps < 1 or args.context + args.steps + 1 > limit:
        raise ValueError(f"--context + --steps + 1 must be within the model's {limit} positions, got "
                         f"{args.context} + {args.steps}")
    text = read_text(args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.context + args.steps + 1]
    if ids.shape[1] < args.context + args.steps + 1:
        raise ValueError(f"the text has {ids.shape[1]} tokens; --context + --steps + 1 = "
                         f"{args.context + args.steps + 1} are needed")
    t = time.perf_counter()
    dense_cache, _ = prefill_dense(model, ids[:, :args.context], args.chunk)
    prefill_s = time.perf_counter() - t
    htf.enable(model, policy=policy, dense_fallback=args.fallback)
    try:
        t = time.perf_counter()
        hsr_cache = htf.HSRCache.from_dense(dense_cache, model.config, policy, dense_fallback=args.fallback)
        index_s = time.perf_counter() - t
        rows = teacher_forced(model, ids, args.context, args.steps, dense_cache, hsr_cache)
    finally:
        htf.disable(model)
    stats = hsr_cache.stats()
    per_step = torch.stack([torch.stack(layer.stats.mass_bound).amax((1, 2)) for layer in hsr_cache.layers])
    env = environment("cpu")
    config = dict(model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
                  text=str(args.text or DEFAULT_TEXT), context=args.context, steps=args.steps,
                  policy=repr(policy), eps=args.eps, dense_fallback=args.fallback,
                  prefill_s=prefill_s, index_build_s=index_s,
                  machine=f"{env['cpu']}, {env['cpu_threads']} threads", environment=env,
                  hsr_version=hsr.__version__)
    result = summarize(rows, stats, config)
    result["mass_bound_per_step"] = per_step.amax(0).tolist()
    return result


def add_arguments(p) -> None:
    p.add_argument("--context", type=int, default=8000, help="tokens prefilled (default 8000; the model has 8192)")
    p.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps compared")
    p.add_argument("--policy", choices=["softmax", "topk", "relu"], default="softmax")
    p.add_argument("--eps", type=float, default=1e-3, help="certified softmax: mass left out at most eps")
    p.add_argument("--topk", type=int, default=256, help="k for --policy topk")
    p.add_argument("--text", help="a UTF-8 text file (default: alice29.txt of the Canterbury corpus)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    p.add_argument("--fallback", action="store_true",
                   help="let each layer's cache read densely when that was timed faster (the keys-read "
                        "numbers then mix both paths)")
    p.add_argument("--json", help="write the result as JSON")
    p.add_argument("--plot", help="write a PNG: keys read per layer and kv head, mass_bound per step")
