"""Growing per-layer caches for decoding: GTACache holds GTA's post-RoPE key heads and value
latents, MLACache MLA's latent and shared RoPE key, KVCache (hsr.buffers) a GQA/MHA layer's
keys and values. All grow by doubling, so an append does not copy the cache, and expose views
of what they hold."""

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
        return self._held(0)

    @property
    def latents(self) -> torch.Tensor:
        return self._held(1)


class MLACache(TokenBuffers):
    """One MLA layer's cache: per token the latent c_kv (kv_rank) and the shared post-RoPE
    key k_rope (rope_dim), stored side by side as one (B, 1, L, kv_rank + rope_dim) tensor so
    that absorbed decoding reads it as its keys and its first kv_rank columns as its values."""

    _names = ("latent",)

    def __init__(self, batch: int, kv_rank: int, rope_dim: int, *, dtype=torch.float32, device="cpu"):
        super().__init__(batch, ((1, kv_rank + rope_dim),), dtype, device)
        self.kv_rank, self.rope_dim = kv_rank, rope_dim

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        for name, t, width in (("c_kv", c_kv, self.kv_rank), ("k_rope", k_rope, self.rope_dim)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:2]) != (self.batch, 1) \
                    or t.shape[3] != width or t.shape[2] != c_kv.shape[2]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"MLACache.append: {name} must be ({self.batch}, 1, L, {width}) with the L of c_kv, "
                                 f"got {got}")
        self.append_tokens(torch.cat([c_kv, k_rope.to(c_kv.dtype)], -1))

    @property
    def entries(self) -> torch.Tensor:
        """(B, 1, L, kv_rank + rope_dim): [c_kv, k_rope] per token."""
        return self._held(0)

    @property
    def latents(self) -> torch.Tensor:
        return self._held(0)[..., :self.kv_rank]
