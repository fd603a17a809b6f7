"""GTA and its baselines as nn.Modules with one interface:

    attn = GTAAttention(cfg)              # or GQAAttention(cfg) (MHA: GQAAttention(MHAConfig(...))),
                                          # MLAAttention(cfg)
    y = attn(x)                           # training: x (B, L, H), full causal sequence, autograd
    cache = attn.new_cache(batch)         # GTACache / KVCache in the module's dtype and device
    y = attn(x_prompt, cache=cache)       # prefill: appends, attends causally to the cache
    y = attn(x_next, cache=cache)         # decode (or any chunk): same call

With a cache and autograd off (inference), attention runs in hsr's kernels over the cache
(hsr.gta_attention / hsr.attention, CPU or CUDA); with autograd on, the same math runs in
torch so gradients flow. Positions continue from cache.length. A GTA module also accepts an
hsr.HSRKVCache built by ``hsr_cache(...)``: decode steps then read only the keys the index
and key sketch select, with the cache's certificate (``last_decode_info``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention as hsr_attention
from ..ops import gta_attention as hsr_gta_attention
from ..buffers import KVCache
from .cache import GTACache, MLACache
from .config import GQAConfig, GTAConfig, MLAConfig


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, L, d) at positions start .. start + L - 1,
    over the full d (pairs (i, i + d/2), as Llama), computed in fp32 (fp64 for fp64 x)."""
    d, length = x.shape[-1], x.shape[2]
    ct = torch.promote_types(x.dtype, torch.float32)
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=ct) / d)
    angles = torch.arange(start, start + length, device=x.device, dtype=ct)[:, None] * inv
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(ct)[..., : d // 2], x.to(ct)[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def causal_mask(len_q: int, len_k: int, device) -> torch.Tensor:
    """(Lq, Lk) bool, True where query i sees key j: j <= i + Lk - Lq (the last query is the
    last token, as in decoding from a cache)."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + (len_k - len_q)


def grouped_attention(q, k, v, scale=None):
    """Softmax attention in torch (autograd), causal with the last query aligned to the last
    key: q (B, Hq, Lq, d), k (B, Hk, Lk, d), v (B, Hv, Lk, dv) with Hk and Hv dividing Hq
    (query head h reads key head h // (Hq / Hk) and value head h // (Hq / Hv)); scale
    defaults to 1/sqrt(d)."""
    hq = q.shape[1]
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    lq, lk = q.shape[2], k.shape[2]
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(lq, lk, q.device), scale=scale)


def split_heads(t: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """A projection (B, L, heads * width) as (B, heads, L, width)."""
    return t.view(t.shape[0], t.shape[1], heads, width).transpose(1, 2)


def _check_config(name: str, config, cls) -> None:
    if not isinstance(config, cls):
        raise ValueError(f"{name}: config must be a{'n' if cls.__name__[0] in 'AEIMO' else ''} {cls.__name__}, "
                         f"got {type(config).__name__}")


def _use_kernels(module: nn.Module) -> bool:
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


def _check_input(name, module, x, cache, cache_types):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != module.config.hidden_size:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be (B, L, {module.config.hidden_size}), got {got}")
    if cache is not None and not isinstance(cache, cache_types):
        raise ValueError(f"{name}: cache must be one of {[t.__name__ for t in cache_types]} "
                         f"(from new_cache), got {type(cache).__name__}")
    if cache is not None and cache.batch != x.shape[0]:
        raise ValueError(f"{name}: the cache holds batch {cache.batch} but x has batch {x.shape[0]}")


class GTAAttention(nn.Module):
    """Grouped-head latenT Attention (arXiv 2506.17286; DESIGN 1): per head i,
    O_i = (softmax(Q_g K^T / sqrt(d_h)) C W_P,i) * sigmoid(x W_G,i), then W_O."""

    def __init__(self, config: GTAConfig, *, device=None, dtype=None):
        super().__init__()
        _check_config("GTAAttention", config, GTAConfig)
        self.config = c = config
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, c.num_q_groups * c.head_dim, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_k_heads * c.head_dim, **kw)
        self.c_proj = nn.Linear(c.hidden_size, c.num_c_groups * c.latent_dim, **kw)
        self.g_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, **kw)
        self.w_p = nn.Parameter(torch.empty(c.num_heads, c.latent_dim, c.head_dim, device=device, dtype=dtype))
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, **kw)
        nn.init.normal_(self.w_p, std=1.0 / math.sqrt(c.latent_dim))
        self.last_decode_info = None

    def new_cache(self, batch: int) -> GTACache:
        c, p = self.config, self.o_proj.weight
        return GTACache(batch, c.num_k_heads, c.head_dim, c.num_c_groups, c.latent_dim, dtype=p.dtype,
                        device=p.device)

    def hsr_cache(self, batch: int, **kwargs):
        """An hsr.HSRKVCache over this layer's key heads and value latents (the index is built
        over the key heads; all query groups share it), for ``forward(x, cache=...)``.
        Needs num_c_groups == num_k_heads (one latent per key head). kwargs go to
        HSRKVCache (policy, leaf_size, sketch, ...). CPU only, like HSRKVCache."""
        from ..kvcache import HSRKVCache
        c, p = self.config, self.o_proj.weight
        if c.num_c_groups != c.num_k_heads:
            raise ValueError(f"GTAAttention.hsr_cache: needs num_c_groups == num_k_heads (one latent per indexed "
                             f"key head), got {c.num_c_groups} and {c.num_k_heads}")
        return HSRKVCache(batch, c.num_k_heads, c.head_dim, value_dim=c.latent_dim, dtype=p.dtype,
                          device=p.device, **kwargs)

    def project(self, x: torch.Tensor, start: int):
        """q (B, n_q, L, d_h) and k (B, n_k, L, d_h) after RoPE at positions start.., the
        latents c (B, n_c, L, d_l) and the gate logits (B, n_h, L, d_h)."""
        c = self.config
        q = rope(split_heads(self.q_proj(x), c.num_q_groups, c.head_dim), start, c.rope_theta)
        k = rope(split_heads(self.k_proj(x), c.num_k_heads, c.head_dim), start, c.rope_theta)
        lat = split_heads(self.c_proj(x), c.num_c_groups, c.latent_dim)
        gate = split_heads(self.g_proj(x), c.num_heads, c.head_dim)
        return q, k, lat, gate

    def decode_heads(self, z: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Each head's value from its group's attention-weighted latent z (B, n_q, L, d_l):
        (z_g W_P,i) * sigmoid(gate_i) -> (B, n_h, L, d_h) (torch, autograd)."""
        c = self.config
        B, _, L, _ = z.shape
        r = c.heads_per_group
        o = torch.matmul(z.unsqueeze(2), self.w_p.view(c.num_q_groups, r, c.latent_dim, c.head_dim))
        return o.reshape(B, c.num_heads, L, c.head_dim) * torch.sigmoid(gate)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        from ..kvcache import HSRKVCache
        _check_input("GTAAttention", self, x, cache, (GTACache, HSRKVCache))
        c = self.config
        B, L, _ = x.shape
        q, k, lat, gate = self.project(x, 0 if cache is None else cache.length)
        if cache is None:
            o = self.decode_heads(grouped_attention(q, k, lat), gate)
        elif isinstance(cache, HSRKVCache):
            o = self._attend_hsr(cache, q, k, lat, gate)
        else:
            cache.append(k, lat)
            if _use_kernels(self):
                o = hsr_gta_attention(q, cache.keys, cache.latents, self.w_p, gate, causal=True)
            else:
                o = self.decode_heads(grouped_attention(q, cache.keys, cache.latents), gate)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, c.num_heads * c.head_dim))

    def _attend_hsr(self, cache, q, k, lat, gate):
        """Prefill chunks are attended densely (the kernel, over everything cached) while the
        keys are indexed; a one-token step is an HSRKVCache.decode over the latents."""
        if not _use_kernels(self):
            raise ValueError("GTAAttention: an HSRKVCache is for inference; run under torch.no_grad()")
        if q.shape[2] == 1 and cache.length > 0:
            z, self.last_decode_info = cache.decode(q, k, lat)
            return self.decode_heads(z, gate)
        cache.extend(k, lat)
        return hsr_gta_attention(q, cache.keys, cache.values, self.w_p, gate, causal=True)


class GQAAttention(nn.Module):
    """Grouped-query attention (MHA when num_kv_heads == num_heads), the baseline GTA is
    compared with, with GTAAttention's interface."""

    def __init__(self, config: GQAConfig, *, device=None, dtype=None):
        super().__init__()
        _check_config("GQAAttention", config, GQAConfig)
        self.config = c = config
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **kw)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, **kw)

    def new_cache(self, batch: int) -> KVCache:
        c, p = self.config, self.o_proj.weight
        return KVCache(batch, c.num_kv_heads, c.head_dim, dtype=p.dtype, device=p.device)

    def project(self, x: torch.Tensor, start: int):
        """q (B, n_h, L, d), k and v (B, Hkv, L, d); q and k after RoPE at positions start.."""
        c = self.config
        q = rope(split_heads(self.q_proj(x), c.num_heads, c.head_dim), start, c.rope_theta)
        k = rope(split_heads(self.k_proj(x), c.num_kv_heads, c.head_dim), start, c.rope_theta)
        return q, k, split_heads(self.v_proj(x), c.num_kv_heads, c.head_dim)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        _check_input("GQAAttention", self, x, cache, (KVCache,))
        c = self.config
        B, L, _ = x.shape
        q, k, v = self.project(x, 0 if cache is None else cache.length)
        if cache is None:
            o = grouped_attention(q, k, v)
        else:
            cache.append(k, v)
            if _use_kernels(self):
                o = hsr_attention(q, cache.keys, cache.values, causal=True)
            else:
                o = grouped_attention(q, cache.keys, cache.values)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, c.num_heads * c.head_dim))


class MLAAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2) with GTAAttention's interface, the
    latent-cache baseline: training expands the latent into per-head keys and values;
    decoding runs absorbed: q_nope_i W_UK,i^T and q_rope_i against the cached [c_kv, k_rope]
    (hsr.gta_attention with one query group per head), then W_UV,i per head."""

    def __init__(self, config: MLAConfig, *, device=None, dtype=None):
        super().__init__()
        _check_config("MLAAttention", config, MLAConfig)
        self.config = c = config
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * (c.qk_nope_dim + c.rope_dim), **kw)
        self.kv_down = nn.Linear(c.hidden_size, c.kv_rank, **kw)
        self.k_rope_proj = nn.Linear(c.hidden_size, c.rope_dim, **kw)
        self.w_uk = nn.Parameter(torch.empty(c.num_heads, c.kv_rank, c.qk_nope_dim, device=device, dtype=dtype))
        self.w_uv = nn.Parameter(torch.empty(c.num_heads, c.kv_rank, c.v_head_dim, device=device, dtype=dtype))
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, **kw)
        nn.init.normal_(self.w_uk, std=1.0 / math.sqrt(c.kv_rank))
        nn.init.normal_(self.w_uv, std=1.0 / math.sqrt(c.kv_rank))

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.config.qk_nope_dim + self.config.rope_dim)

    def new_cache(self, batch: int) -> MLACache:
        c, p = self.config, self.o_proj.weight
        return MLACache(batch, c.kv_rank, c.rope_dim, dtype=p.dtype, device=p.device)

    def project(self, x: torch.Tensor, start: int):
        """q_nope (B, n_h, L, nope), q_rope (B, n_h, L, rope) after RoPE, the latent c_kv
        (B, 1, L, kv_rank) and the shared k_rope (B, 1, L, rope) after RoPE."""
        c = self.config
        q = split_heads(self.q_proj(x), c.num_heads, c.qk_nope_dim + c.rope_dim)
        q_nope, q_rope = q[..., :c.qk_nope_dim], rope(q[..., c.qk_nope_dim:], start, c.rope_theta)
        c_kv = self.kv_down(x).unsqueeze(1)
        k_rope = rope(self.k_rope_proj(x).unsqueeze(1), start, c.rope_theta)
        return q_nope, q_rope, c_kv, k_rope

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        _check_input("MLAAttention", self, x, cache, (MLACache,))
        c = self.config
        B, L, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self.project(x, 0 if cache is None else cache.length)
        if cache is None:
            k = torch.cat([torch.matmul(c_kv, self.w_uk), k_rope.expand(-1, c.num_heads, -1, -1)], -1)
            v = torch.matmul(c_kv, self.w_uv)
            o = grouped_attention(torch.cat([q_nope, q_rope], -1), k, v, scale=self.scale)
        else:
            cache.append(c_kv, k_rope)
            q = torch.cat([torch.matmul(q_nope, self.w_uk.transpose(-1, -2)), q_rope], -1)
            if _use_kernels(self):
                o = hsr_gta_attention(q, cache.entries, cache.latents, self.w_uv, None, scale=self.scale,
                                      causal=True)
            else:
                z = grouped_attention(q, cache.entries, cache.latents, scale=self.scale)
                o = torch.matmul(z, self.w_uv)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, c.num_heads * c.v_head_dim))
