"""HSR decoding inside a transformers model (Llama family: Llama, SmolLM2, Mistral-style GQA).

    import hsr, hsr.integrations.transformers as hsr_tf
    hsr_tf.enable(model, policy=hsr.Softmax(eps=1e-3))
    out = model.generate(**inputs, max_new_tokens=64)     # unchanged
    stats = hsr_tf.last_cache(model).stats()               # keys read, mass_bound per layer/head
    hsr_tf.disable(model)

How it plugs in (transformers >= 5, tested with 5.23):
- the attention implementation "hsr" is registered with transformers' AttentionInterface
  (and the sdpa mask builder with AttentionMaskInterface) and set on the model;
- `HSRCache`, a transformers Cache whose layers each own an `hsr.HSRKVCache`, is swapped in
  for the empty cache `generate()` (or a plain forward with use_cache) would use;
- a forward with several query tokens (the prompt, or a chunk of a chunked prefill with
  Lq < Lk) stores its keys and values in the HSRKVCache, whose whole leaves are indexed and
  sketched, and attends densely (torch SDPA, causal); a forward with one query token is a
  decode step: HSRKVCache.decode appends the token's key and value and attends through the
  index with the policy, recording its certificate.
A forward given a non-HSR cache that already holds tokens (e.g. a dense DynamicCache) runs
plain SDPA, so a dense and an HSR decode of the same model can be compared side by side.

Not supported (rejected with an error): padding (an attention_mask with zeros, e.g. a left-
padded batch), beam search and cache cropping/reordering, models on a non-CPU device (the
HSRKVCache is CPU-only so far), and attention variants other than full causal attention
(sliding windows, soft-capping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..kvcache import REBUILD_AFTER, HSRKVCache, ReLU, Softmax, TopK

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("hsr.integrations.transformers needs transformers >= 5 "
                      "(pip install 'hsr[transformers]')") from exc

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(f"hsr.integrations.transformers needs transformers >= 5, found {transformers.__version__}")

ATTN_NAME = "hsr"
_STATE_ATTR = "_hsr_state"


@dataclass
class LayerStats:
    """What the decode steps of one layer did, per step: keys_read (B, Hkv) fractions of the
    keys read in full precision, mass_bound and error_bound (B, Hq), seconds (and of them
    select_seconds and attend_seconds, as in hsr.DecodeInfo), path."""

    keys_read: list = field(default_factory=list)
    mass_bound: list = field(default_factory=list)
    error_bound: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    select_seconds: list = field(default_factory=list)
    attend_seconds: list = field(default_factory=list)
    paths: list = field(default_factory=list)


class HSRLayer(CacheLayerMixin):
    """One layer's cache: an hsr.HSRKVCache, created on the first update (when batch, heads,
    head_dim and dtype are known)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, policy, scale: float | None, cache_kwargs: dict):
        super().__init__()
        self.policy, self.scale, self.cache_kwargs = policy, scale, cache_kwargs
        self.hsr: HSRKVCache | None = None
        self._pending = None
        self.stats = LayerStats()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.device.type != "cpu":
            raise ValueError(f"HSRCache: the HSR KV cache runs on the CPU only so far; the model's keys are on "
                             f"{key_states.device}")
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.hsr = HSRKVCache(b, h, d, dtype=key_states.dtype, policy=self.policy, scale=self.scale,
                              **self.cache_kwargs)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Several tokens: stored (and indexed) now, attended densely by the caller. One token:
        kept pending; the attention function appends it and attends in decode()."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError("HSRCache: a decode token was stored but never attended (the model's attention "
                               "implementation is not 'hsr'; call hsr.integrations.transformers.enable(model))")
        if key_states.shape[2] == 1:
            self._pending = (key_states.contiguous(), value_states.contiguous())
            return key_states, value_states
        self.hsr.extend(key_states.contiguous(), value_states.contiguous())
        self._expose_kv()
        return self.hsr.keys, self.hsr.values  # arrival order, for the caller's causal attention

    def _expose_kv(self):
        """Points keys/values (what transformers may read off a layer: their shapes) at the
        cache's K/V as stored (views: the indexed rows are in leaf order)."""
        self.keys, self.values = self.hsr.stored_keys, self.hsr.stored_values

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def decode(self, query: torch.Tensor) -> torch.Tensor:
        """Attend the pending token's query (B, Hq, 1, D) through the HSR cache; records stats."""
        k_new, v_new = self._pending
        self._pending = None
        out, info = self.hsr.decode(query.to(self.hsr.dtype).contiguous(), k_new, v_new)
        self._expose_kv()
        s = self.stats
        s.keys_read.append(info.keys_read.double() / self.hsr.length)
        s.mass_bound.append(info.mass_bound)
        s.error_bound.append(info.error_bound)
        s.seconds.append(info.seconds)
        s.select_seconds.append(info.select_seconds)
        s.attend_seconds.append(info.attend_seconds)
        s.paths.append(info.path)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if self.hsr is None:
            return 0
        return self.hsr.length + (1 if self._pending is not None else 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.hsr is not None:
            self.hsr.reset()
        self._pending = None
        self.keys = self.values = None
        self.stats = LayerStats()

    def _unsupported(self, what):
        raise NotImplementedError(f"HSRCache does not support {what} (the index would have to follow); "
                                  "use greedy or sampled decoding without beams")

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("reordering the batch (beam search)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping (assisted / speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating the batch (beam search, num_return_sequences > 1)")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("selecting batch rows (contrastive search)")


def _staggered(cache_kwargs: dict, layer: int, layers: int) -> dict:
    """Layer `layer`'s HSRKVCache arguments: rebuild_after scaled by 1 + layer / layers."""
    kwargs = dict(cache_kwargs)
    base = kwargs.get("rebuild_after", REBUILD_AFTER)
    if base is not None:
        kwargs["rebuild_after"] = float(base) * (1.0 + layer / layers)
    return kwargs


class HSRCache(Cache):
    """A transformers Cache with one hsr.HSRKVCache per layer.

    HSRCache(config, policy=hsr.Softmax(eps=1e-3), **HSRKVCache keyword arguments
    (leaf_size, sketch, dense_fallback, probe_every, rebuild_after)). `from_dense(cache, config,
    policy)` builds one from a filled DynamicCache (the prefill is then shared with a dense run).
    The layers grow in step, so their tree rebuilds are staggered: layer i uses rebuild_after
    (0.25 unless given) times 1 + i / num_layers, and no decode step pays every layer's rebuild."""

    def __init__(self, config, policy=None, **cache_kwargs):
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        _check_config(text_config)
        policy = Softmax() if policy is None else policy
        if not isinstance(policy, (Softmax, ReLU, TopK)):
            raise ValueError(f"HSRCache: policy must be hsr.Softmax, hsr.ReLU or hsr.TopK, got {policy!r}")
        scale = getattr(text_config, "query_pre_attn_scalar", None)
        scale = None if scale is None else scale ** -0.5
        HSRKVCache(1, 1, 8, policy=policy, scale=scale, **cache_kwargs)   # rejects bad arguments now
        self.policy = policy
        layers = text_config.num_hidden_layers
        super().__init__(layers=[HSRLayer(policy, scale, _staggered(cache_kwargs, i, layers)) for i in range(layers)])

    @classmethod
    def from_dense(cls, dense: "Cache", config, policy=None, **cache_kwargs) -> "HSRCache":
        """An HSRCache holding (and indexing) the keys and values of a filled dense cache."""
        cache = cls(config, policy, **cache_kwargs)
        for layer, source in zip(cache.layers, dense.layers):
            if source.keys is None or source.keys.numel() == 0:
                continue
            layer.lazy_initialization(source.keys, source.values)
            layer.hsr.prefill(source.keys.contiguous(), source.values.contiguous())
            layer._expose_kv()
        return cache

    def stats(self) -> dict:
        """Per layer, over the decode steps so far: keys_read_fraction per kv head (mean over
        steps and batch), mass_bound_max / mass_bound_mean per q head, error_bound_max, the
        attention seconds (select_seconds and attend_seconds of them, as in hsr.DecodeInfo), and
        the number of steps that read densely; and the totals."""
        per_layer = []
        for i, layer in enumerate(self.layers):
            s = layer.stats
            if not s.keys_read:
                per_layer.append(dict(layer=i, steps=0))
                continue
            read = torch.stack(s.keys_read)                  # (steps, B, Hkv)
            mass = torch.stack(s.mass_bound)                 # (steps, B, Hq)
            err = torch.stack(s.error_bound)
            per_layer.append(dict(
                layer=i, steps=len(s.keys_read),
                keys_read_fraction=read.mean().item(),
                keys_read_fraction_per_head=read.mean((0, 1)).tolist(),
                mass_bound_max=mass.max().item(), mass_bound_mean=mass.mean().item(),
                mass_bound_max_per_head=mass.amax((0, 1)).tolist(),
                error_bound_max=err.max().item(),
                seconds=float(sum(s.seconds)), select_seconds=float(sum(s.select_seconds)),
                attend_seconds=float(sum(s.attend_seconds)), dense_steps=sum(p == "dense" for p in s.paths)))
        active = [p for p in per_layer if p["steps"]]
        total = dict(
            steps=max((p["steps"] for p in active), default=0),
            keys_read_fraction=sum(p["keys_read_fraction"] for p in active) / len(active) if active else None,
            mass_bound_max=max((p["mass_bound_max"] for p in active), default=None),
            seconds=sum(p["seconds"] for p in active), select_seconds=sum(p["select_seconds"] for p in active),
            attend_seconds=sum(p["attend_seconds"] for p in active))
        return dict(per_layer=per_layer, **total)


def _check_config(config) -> None:
    if getattr(config, "sliding_window", None) not in (None, 0) and getattr(config, "use_sliding_window", True):
        raise ValueError("hsr.integrations.transformers: sliding-window attention is not supported "
                         f"(config.sliding_window = {config.sliding_window})")
    for name in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"hsr.integrations.transformers: {name} is not supported")
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        raise ValueError("hsr.integrations.transformers: every layer must be full attention, got "
                         f"layer_types {sorted(set(config.layer_types))}")


class _State:
    """Shared by the model and its attention modules: the policy, the cache of the running
    forward (None: plain SDPA) and the attention time per path."""

    def __init__(self, policy, cache_kwargs, previous_impl, hook):
        self.policy, self.cache_kwargs = policy, cache_kwargs
        self.previous_impl, self.hook = previous_impl, hook
        self.cache: HSRCache | None = None
        self.last_cache: HSRCache | None = None
        self.attention_seconds = {"hsr": 0.0, "dense": 0.0}


def hsr_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers attention function: a decode step through the layer's HSRKVCache, anything
    else through torch SDPA."""
    state = getattr(module, _STATE_ATTR, None)
    cache = None if state is None else state.cache
    layer = None
    if cache is not None and module.layer_idx < len(cache.layers):
        layer = cache.layers[module.layer_idx]
    start = time.perf_counter()
    if layer is not None and layer.has_pending:
        if query.shape[2] != 1:
            raise RuntimeError("hsr attention: a pending decode token met a multi-token query")
        if scaling is not None and abs(scaling - layer.hsr.scale) > 1e-12 * scaling:
            raise RuntimeError(f"hsr attention: the model's scaling {scaling} differs from the cache's "
                               f"{layer.hsr.scale}")
        out = layer.decode(query).transpose(1, 2).contiguous()
        kind = "hsr"
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        kind = "dense"
    if state is not None:
        state.attention_seconds[kind] += time.perf_counter() - start
    return out, None


AttentionInterface.register(ATTN_NAME, hsr_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model):
    """The model's attention modules (Llama family: they have layer_idx and q_proj)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def _uses_cache(model, kwargs) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(model.config.use_cache) if use_cache is None else bool(use_cache)


def _forward_pre_hook(model, args, kwargs):
    state: _State = getattr(model, _STATE_ATTR)
    cache = kwargs.get("past_key_values")
    fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
    if isinstance(cache, HSRCache):
        state.cache = cache
    elif fresh and _uses_cache(model, kwargs) and len(args) <= 3:
        cache = HSRCache(model.config, state.policy, **state.cache_kwargs)
        kwargs["past_key_values"] = cache
        state.cache = cache
    else:
        state.cache = None
    if state.cache is not None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("hsr.integrations.transformers: padding (an attention_mask with zeros) is not "
                             "supported by the HSR cache; run sequences of equal length, or batch size 1")
        state.last_cache = state.cache
    return args, kwargs


def enable(model, policy=None, **cache_kwargs):
    """Make `model` decode through HSR: prefill densely while building the index per layer,
    then every single-token step through hsr.HSRKVCache with `policy` (default
    hsr.Softmax(eps=1e-3)). cache_kwargs go to each HSRKVCache (leaf_size, sketch,
    dense_fallback, probe_every). `model.generate()` works unchanged. Returns the model."""
    if hasattr(model, _STATE_ATTR):
        raise ValueError("hsr.integrations.transformers.enable: already enabled (call disable(model) first)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _check_config(config)
    policy = Softmax() if policy is None else policy
    HSRCache(model.config, policy, **cache_kwargs)       # rejects a bad policy or cache argument
    modules = attention_modules(model)
    if not modules:
        raise ValueError("hsr.integrations.transformers.enable: no attention modules with layer_idx and q_proj "
                         "found (a Llama-family model is expected)")
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    hook = model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    state = _State(policy, dict(cache_kwargs), previous, hook)
    setattr(model, _STATE_ATTR, state)
    for m in modules:
        setattr(m, _STATE_ATTR, state)
    return model


def disable(model):
    """Undo enable(): the previous attention implementation, no hook, no HSR state."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("hsr.integrations.transformers.disable: HSR is not enabled on this model")
    state.hook.remove()
    for m in attention_modules(model):
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    delattr(model, _STATE_ATTR)
    model.set_attn_implementation(state.previous_impl or "sdpa")
    return model


def is_enabled(model) -> bool:
    return hasattr(model, _STATE_ATTR)


def last_cache(model) -> HSRCache | None:
    """The HSRCache of the model's latest forward that used one (e.g. the one generate() made)."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.last_cache


def attention_seconds(model) -> dict:
    """Wall seconds spent in attention since enable(), per path: "hsr" (decode steps through the
    HSR cache) and "dense" (prefill, and forwards with a dense cache)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("hsr.integrations.transformers: HSR is not enabled on this model")
    return dict(state.attention_seconds)
