"""Growing per-layer caches for decoding: GTACache holds GTA's post-RoPE key heads and value
latents, KVCache a GQA/MHA layer's keys and values. Both grow by doubling, so an append does
not copy the cache, and expose views of what they hold."""

from __future__ import annotations

import torch

from ..buffers import TokenBuffers


class GTACache(TokenBuffers):
    """One GTA layer's cache: post-RoPE keys (B, n_k, L, d_h) and value latents
    (B, n_c, L, d_l) per token; n_k d_h + n_c d_l elements per token (DESIGN 1)."""

    _names = ("k", "c")

    def __init__(self, batch: int, num_k_heads: int, head_dim: int, num_c_groups: int, latent_dim: int, *,
                 dtype=torch.float32, device="cpu"):
        super().__init__(batch, ((num_k_heads, head_dim), (num_c_groups, latent_dim)), dtype, device)

    def append(self, k: torch.Tensor, c: torch.Tensor) -> None:
        self.append_tokens(k, c)

    @property
    def keys(self) -> torch.Tensor:
        return self.views()[0]

    @property
    def latents(self) -> torch.Tensor:
        return self.views()[1]


class KVCache(TokenBuffers):
    """One GQA/MHA layer's cache: post-RoPE keys and values (B, Hkv, L, D)."""

    _names = ("k", "v")

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, dtype=torch.float32, device="cpu"):
        super().__init__(batch, ((num_kv_heads, head_dim), (num_kv_heads, head_dim)), dtype, device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.append_tokens(k, v)

    @property
    def keys(self) -> torch.Tensor:
        return self.views()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.views()[1]
