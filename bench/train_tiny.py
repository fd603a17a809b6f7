"""Trains tiny byte-level LMs that differ only in their attention (MHA, GQA, GTA, ReLU^2) on
public-domain English text and compares them: eval loss / perplexity, cache size, decode
speed, and for GTA and ReLU models the HSR decode path on the learned keys.

    python bench/train_tiny.py --json bench/results/train_tiny.json --plot bench/results/train_tiny.png

Data: the Canterbury corpus texts (hsr.realdata.ensure_corpus: alice29, asyoulik, lcet10,
plrabn12 from brotli's sdist), bytes as tokens (vocab 256, no tokenizer to download); the
last 10% of every text is held out. Every variant gets the parameter count of the MHA model
(its MLP width is adjusted: hsr.models.matched_ffn_size), the same seed, the same batches in
the same order and the same schedule (AdamW, warmup + cosine). Decode: a prompt of
--decode-context held-out bytes is prefilled, then --decode-steps teacher-forced one-byte
steps are timed (median ms per step, the whole model) with the dense caches (hsr kernels)
and, for GTA / ReLU, with hsr.HSRKVCache caches (certified softmax eps / exact ReLU).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import hsr
from hsr.benchmarking import environment, figure, format_table, write_json
from hsr.models import ATTENTIONS, TinyLM, TinyLMConfig, matched_ffn_size
from hsr.realdata import CORPUS_FILES, ensure_corpus


def load_bytes(holdout: float = 0.1):
    """(train, eval) int64 byte tensors: the last `holdout` of every corpus text is eval."""
    folder = ensure_corpus()
    train, held = [], []
    for name in CORPUS_FILES:
        data = torch.frombuffer(bytearray((folder / name).read_bytes()), dtype=torch.uint8).long()
        cut = int(len(data) * (1 - holdout))
        train.append(data[:cut])
        held.append(data[cut:])
    return torch.cat(train), torch.cat(held)


def batches(data, steps, batch, seq, seed, device):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).to(device)


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, data, args):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve = []
    start = time.perf_counter()
    for step, xy in enumerate(batches(data, args.steps, args.batch, args.seq, args.seed, args.device)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = F.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            curve.append((step, loss.item()))
            print(f"  step {step:4d} loss {loss.item():.4f}", flush=True)
    return curve, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, data, seq, windows, device):
    """Mean next-byte cross entropy (nats) over `windows` evenly spaced held-out windows."""
    starts = torch.linspace(0, len(data) - seq - 2, windows).long().tolist()
    total = 0.0
    for s in starts:
        xy = data[s:s + seq + 1].unsqueeze(0).to(device)
        total += float(F.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten()))
    return total / len(starts)


@torch.no_grad()
def decode_run(model, prompt, steps, caches):
    """Prefill `prompt` (1, L) into `caches`, then `steps` one-byte steps on the bytes that
    follow: (median ms per step, logits of every step (steps, vocab))."""
    model(prompt[:, :-steps], caches)
    times, logits = [], []
    for i in range(prompt.shape[1] - steps, prompt.shape[1]):
        t = time.perf_counter()
        out = model(prompt[:, i:i + 1], caches)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        logits.append(out[0, -1])
    times.sort()
    return times[len(times) // 2], torch.stack(logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--eps", type=float, default=1e-3, help="certified softmax eps of GTA's HSR decode")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (HSR decode columns are CPU-only)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    train_data, eval_data = load_bytes()
    print(f"train {len(train_data)} bytes, eval {len(eval_data)} bytes", flush=True)
    base = TinyLMConfig(attention="mha", hidden_size=args.hidden, num_layers=args.layers)
    budget = TinyLM(base).num_parameters()
    prompt = eval_data[:args.decode_context + args.decode_steps].unsqueeze(0).to(args.device)
    rows, curves = [], {}
    for variant in args.variants:
        cfg = matched_ffn_size(TinyLMConfig(attention=variant, hidden_size=args.hidden, num_layers=args.layers),
                               budget)
        torch.manual_seed(args.seed)
        model = TinyLM(cfg).to(args.device)
        print(f"{variant}: {model.num_parameters()} parameters, ffn {cfg.ffn_size}", flush=True)
        curve, seconds = train(model, train_data, args)
        model.eval()
        loss = evaluate(model, eval_data, args.seq, args.eval_windows, args.device)
        caches = model.new_caches(1)  # after decode_run they hold the whole prompt
        ms, dense_logits = decode_run(model, prompt, args.decode_steps, caches)
        row = dict(variant=variant, params=model.num_parameters(), ffn=cfg.ffn_size,
                   kv_elements_per_token=cfg.kv_cache_elements_per_token(),
                   cache_kib=sum(c.nbytes for c in caches) / 1024, context=prompt.shape[1],
                   eval_loss=loss, eval_ppl=math.exp(loss), bits_per_byte=loss / math.log(2),
                   train_seconds=seconds, decode_ms=ms)
        if variant in ("gta", "relu") and args.device == "cpu":
            # The sparse path on every step (no timed dense fallback), so the fraction read is the
            # selection's own.
            kw = dict(dense_fallback=False)
            if variant == "gta":
                kw["policy"] = hsr.Softmax(eps=args.eps)
            hsr_ms, hsr_logits = decode_run(model, prompt, args.decode_steps, model.hsr_caches(1, **kw))
            infos = [b.attn.last_decode_info for b in model.blocks]
            n = prompt.shape[1]
            row.update(hsr_decode_ms=hsr_ms,
                       hsr_keys_read=sum(float(i.keys_read.double().mean()) for i in infos) / len(infos) / n,
                       hsr_mass_bound=max(float(i.mass_bound.max()) for i in infos),
                       hsr_max_logit_diff=float((hsr_logits - dense_logits).abs().max()),
                       hsr_policy=f"Softmax(eps={args.eps})" if variant == "gta" else
                       f"ReLU(alpha={cfg.relu_alpha}, learned bias)",
                       relu_bias=[round(float(b.attn.bias), 4) for b in model.blocks] if variant == "relu" else None)
        rows.append(row)
        curves[variant] = curve
        print(row, flush=True)

    print(format_table(rows, [
        ("variant", "attention", ""), ("params", "params", "d"), ("kv_elements_per_token", "cache elem/token", "d"),
        ("cache_kib", "cache KiB", ".0f"), ("eval_loss", "eval loss", ".4f"), ("eval_ppl", "ppl", ".3f"),
        ("bits_per_byte", "bits/byte", ".3f"), ("train_seconds", "train s", ".0f"), ("decode_ms", "decode ms", ".2f"),
        ("hsr_decode_ms", "HSR ms", ".2f"), ("hsr_keys_read", "HSR keys read", ".3f")]))
    if args.json:
        write_json(args.json, {"benchmark": "tiny LM, attention variants, equal parameters", "environment":
                               environment(args.device), "args": vars(args), "rows": rows, "curves": curves})
    if args.plot:
        with figure(args.plot) as (fig, ax):
            for variant, curve in curves.items():
                ax.plot([s for s, _ in curve], [l for _, l in curve], label=variant)
            ax.set_xlabel("step")
            ax.set_ylabel("train loss (nats/byte)")
            ax.set_title(f"tiny byte LMs, {budget} parameters each")
            ax.legend()


if __name__ == "__main__":
    main()
