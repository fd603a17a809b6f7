"""Real attention inputs: SmolLM2's post-RoPE queries, keys and values of every layer for a text.

    hsr capture --out smollm2_kv.pt [--text FILE] [--context 8192] [--queries 32]

The text's first `context` tokens run through the model (dense, chunked); the file holds, per
layer, the keys and values of all positions (Hkv, L, D) and the queries of the last `queries`
positions (Hq, queries, D), float32, as seen by the attention (after RoPE). The benchmarks read
it with `load_capture` (bench/bench_index.py --capture, bench/bench_decode_cpu.py --capture).
"""

from __future__ import annotations

import sys

import torch

_CAPTURE_ATTR = "_hsr_capture"
_ATTN_NAME = "hsr_capture"


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    store = getattr(module, _CAPTURE_ATTR, None)
    if store is not None:
        store.append(query.detach()[0].float().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture(model, ids: torch.Tensor, queries: int, chunk: int = 1024) -> dict:
    """Run ids (1, L) through a Llama-family model; returns dict(q, k, v) of per-layer lists."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from .demo import prefill_dense
    from .integrations.transformers import attention_modules

    n = ids.shape[1]
    if not 1 <= queries <= n:
        raise ValueError(f"capture: queries must be in [1, {n}], got {queries}")
    head = n - queries
    cache, _ = prefill_dense(model, ids[:, :head], chunk) if head else (None, None)
    AttentionInterface.register(_ATTN_NAME, _capturing_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTN_NAME)
    for m in modules:
        setattr(m, _CAPTURE_ATTR, [])
    try:
        if cache is None:
            from transformers import DynamicCache
            cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, head:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        q = [torch.cat(getattr(m, _CAPTURE_ATTR), 1) for m in sorted(modules, key=lambda m: m.layer_idx)]
    finally:
        for m in modules:
            delattr(m, _CAPTURE_ATTR)
        model.set_attn_implementation(previous or "sdpa")
    k = [layer.keys[0].float().clone() for layer in cache.layers]
    v = [layer.values[0].float().clone() for layer in cache.layers]
    return dict(q=q, k=k, v=v)


def capture_to_file(path: str, text: str | None = None, context: int = 8192, queries: int = 32) -> str:
    from .realdata import DEFAULT_TEXT, load_smollm2, read_text
    print("loading SmolLM2-135M-Instruct (GGUF, offline) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_smollm2()
    if not 1 <= context <= model.config.max_position_embeddings:
        raise ValueError(f"--context must be in [1, {model.config.max_position_embeddings}], got {context}")
    ids = tokenizer(read_text(text), return_tensors="pt").input_ids[:, :context]
    if ids.shape[1] < context:
        raise ValueError(f"the text has only {ids.shape[1]} tokens, --context is {context}")
    data = capture(model, ids, queries)
    data["meta"] = dict(model="SmolLM2-135M-Instruct", text=str(text or DEFAULT_TEXT), context=context,
                        queries=queries, query_positions=list(range(context - queries, context)),
                        scale=model.config.head_dim ** -0.5)
    torch.save(data, path)
    return path


def load_capture(path: str) -> dict:
    """A capture file: dict(q, k, v: per-layer lists of float32 tensors, meta)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("q", "k", "v", "meta"):
        if key not in data:
            raise ValueError(f"{path}: not an hsr capture file (no {key!r})")
    return data
