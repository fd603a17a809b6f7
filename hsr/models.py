"""A tiny decoder-only language model whose attention is chosen by name, for comparing GTA
with MHA and GQA (and ReLU^alpha attention) at equal parameter budgets on real text.

    cfg = TinyLMConfig(attention="gta")          # "mha" | "gqa" | "mla" | "gta" | "relu"
    model = TinyLM(cfg)
    logits = model(ids)                          # ids (B, L) int64 -> (B, L, vocab), training
    caches = model.new_caches(batch)             # one per layer (hsr.gta caches)
    logits = model(prompt, caches=caches)        # prefill, then one token at a time

Byte-level (vocab 256), pre-norm blocks (RMSNorm, attention, SwiGLU MLP), tied embeddings.
``matched_ffn_size`` sizes each variant's MLP so that every variant has the parameter count
of a reference one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .buffers import KVCache
from .gta import GQAAttention, GQAConfig, GTAAttention, GTAConfig, MLAAttention, MLAConfig, causal_mask
from .gta.config import check_positive_int
from .ops import attention as hsr_attention

ATTENTIONS = ("mha", "gqa", "mla", "gta", "relu")


@dataclass(frozen=True)
class TinyLMConfig:
    """attention: "mha" (num_heads kv heads), "gqa" (kv_heads), "mla" (a latent of
    mla_rank and a shared RoPE key of mla_rope_dim), "gta" (q_groups query groups, one key
    head, one latent of latent_dim) or "relu" (GQA-shaped, ReLU^relu_alpha scores with a
    learned bias per layer, normalised)."""

    attention: str = "gta"
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    head_dim: int = 16
    kv_heads: int = 2
    q_groups: int = 2
    latent_dim: int = 32
    ffn_size: int = 384
    relu_alpha: int = 2
    mla_rank: int = 32
    mla_rope_dim: int = 8

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"TinyLMConfig: attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "kv_heads", "q_groups",
                     "latent_dim", "ffn_size", "relu_alpha", "mla_rank", "mla_rope_dim"):
            check_positive_int("TinyLMConfig", name, getattr(self, name))
        self.attention_config()  # validates the attention shape

    def attention_config(self):
        h, n, d = self.hidden_size, self.num_heads, self.head_dim
        if self.attention == "mha":
            return GQAConfig(h, n, n, d)
        if self.attention in ("gqa", "relu"):
            return GQAConfig(h, n, self.kv_heads, d)
        if self.attention == "mla":
            return MLAConfig(h, n, self.mla_rank, d, self.mla_rope_dim, d)
        return GTAConfig(h, n, self.q_groups, 1, 1, d, self.latent_dim)

    def kv_cache_elements_per_token(self) -> int:
        """All layers together."""
        return self.num_layers * self.attention_config().kv_cache_elements_per_token()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class ReLUAttention(GQAAttention):
    """GQA-shaped attention with ReLU^alpha scores: A = relu(q k^T / sqrt(d) - b)^alpha, rows
    normalised (a row with no positive score gives 0), b a learned scalar per layer. At
    inference the kernel is hsr.attention(kind="relu"), so hsr.ReLU(alpha, bias=b) decodes it
    exactly with an HSRKVCache."""

    def __init__(self, config: GQAConfig, alpha: int, *, device=None, dtype=None):
        super().__init__(config, device=device, dtype=dtype)
        self.alpha = alpha
        self.bias = nn.Parameter(torch.zeros((), device=device, dtype=torch.float32))
        self.last_decode_info = None

    def _attend(self, q, k, v):
        hq = q.shape[1]
        k = k.repeat_interleave(hq // k.shape[1], 1)
        v = v.repeat_interleave(hq // v.shape[1], 1)
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        a = torch.relu(s - self.bias) ** self.alpha
        a = a.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), 0.0)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-20)
        return torch.matmul(a, v.float()).to(q.dtype)

    def hsr_cache(self, batch: int, **kwargs):
        """An hsr.HSRKVCache whose policy is this layer's ReLU^alpha with its learned bias
        (exact: only keys with weight 0 are skipped). kwargs go to HSRKVCache."""
        from .kvcache import HSRKVCache, ReLU
        c, p = self.config, self.o_proj.weight
        return HSRKVCache(batch, c.num_kv_heads, c.head_dim, dtype=p.dtype, device=p.device,
                          policy=ReLU(alpha=self.alpha, bias=self.bias.item(), normalize=True), **kwargs)

    def forward(self, x, cache=None):
        from .kvcache import HSRKVCache
        if not isinstance(cache, (KVCache, HSRKVCache, type(None))):
            raise ValueError(f"ReLUAttention: cache must be a KVCache (from new_cache) or an HSRKVCache (from "
                             f"hsr_cache), got {type(cache).__name__}")
        c = self.config
        B, L, _ = x.shape
        if isinstance(cache, HSRKVCache) and torch.is_grad_enabled():
            raise ValueError("ReLUAttention: an HSRKVCache is for inference; run under torch.no_grad()")
        q, k, v = self.project(x, 0 if cache is None else cache.length)
        if isinstance(cache, HSRKVCache) and L == 1 and cache.length > 0:
            o, self.last_decode_info = cache.decode(q, k, v)
        else:
            if isinstance(cache, HSRKVCache):
                cache.extend(k, v)
            elif cache is not None:
                cache.append(k, v)
            if cache is not None:
                k, v = cache.keys, cache.values
            if cache is not None and not torch.is_grad_enabled():
                o = hsr_attention(q, k, v, kind="relu", alpha=self.alpha, bias=self.bias.item(), causal=True)
            else:
                o = self._attend(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, c.num_heads * c.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        acfg = cfg.attention_config()
        if cfg.attention == "gta":
            self.attn = GTAAttention(acfg)
        elif cfg.attention == "relu":
            self.attn = ReLUAttention(acfg, cfg.relu_alpha)
        elif cfg.attention == "mla":
            self.attn = MLAAttention(acfg)
        else:
            self.attn = GQAAttention(acfg)
        self.norm1, self.norm2 = RMSNorm(cfg.hidden_size), RMSNorm(cfg.hidden_size)
        self.up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        gate, up = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        if not isinstance(cfg, TinyLMConfig):
            raise ValueError(f"TinyLM: cfg must be a TinyLMConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.apply(self._init)
        for b in self.blocks:  # residual branches start small, scaled by depth
            nn.init.normal_(b.attn.o_proj.weight, std=0.02 / math.sqrt(2 * cfg.num_layers))
            nn.init.normal_(b.down.weight, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def new_caches(self, batch: int) -> list:
        return [b.attn.new_cache(batch) for b in self.blocks]

    def hsr_caches(self, batch: int, **kwargs) -> list:
        """One hsr.HSRKVCache per layer (GTA and ReLU models): decode steps read only what
        the index and key sketch select. kwargs go to HSRKVCache (a GTA model takes its
        policy from them, a ReLU model uses its own learned ReLU^alpha)."""
        if self.config.attention not in ("gta", "relu"):
            raise ValueError(f"TinyLM.hsr_caches: needs a 'gta' or 'relu' model, got {self.config.attention!r}")
        return [b.attn.hsr_cache(batch, **kwargs) for b in self.blocks]

    def forward(self, ids: torch.Tensor, caches=None) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"TinyLM: ids must be a (B, L) int64 tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"TinyLM: token ids must lie in [0, {self.config.vocab_size})")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"TinyLM: caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return F.linear(self.norm(x), self.embed.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def matched_ffn_size(cfg: TinyLMConfig, target_params: int) -> TinyLMConfig:
    """cfg with the MLP width whose model's parameter count is closest to target_params."""
    per_unit = cfg.num_layers * 3 * cfg.hidden_size  # up (2 x) and down per MLP channel
    base = TinyLM(replace(cfg, ffn_size=1)).num_parameters() - per_unit
    ffn = max(1, round((target_params - base) / per_unit))
    return replace(cfg, ffn_size=ffn)
