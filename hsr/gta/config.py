"""Configurations of GTA and of the baselines it is compared with, and their accounting.

The accounting follows the GTA paper (arXiv 2506.17286, DESIGN 1):
- ``kv_cache_elements_per_token()``: elements one token adds to one layer's cache;
- ``attention_flops(N)``: multiply-accumulates of the attention itself (scores and the
  weighted sum of values, no projections) over all N x N query/key pairs of one layer, with
  no causal halving: the paper's "per N^2" count. For the 1B shape GTA gives
  n_q (d_h + d_l) = 5 (64 + 128) = 960 and GQA n_h (d_h + d_h) = 20 * 128 = 2560.
- ``attention_params()``: weights of one attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_positive_int(cls, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}: {name} must be a positive integer, got {value!r}")


def _divides(cls, what_small, small, what_big, big):
    if big % small:
        raise ValueError(f"{cls}: {what_big} ({big}) must be a multiple of {what_small} ({small})")


@dataclass(frozen=True)
class GTAConfig:
    """Grouped-head latenT Attention.

    hidden_size H; num_heads n_h output heads of head_dim d_h; num_q_groups n_q query groups
    (each one attention map shared by its n_h / n_q heads); num_k_heads n_k key heads of d_h
    (query group g uses key head g // (n_q / n_k)); num_c_groups n_c value latents of
    latent_dim d_l (query group g uses latent g // (n_q / n_c)). Head i decodes its group's
    attention-weighted latent with its own W_P,i (d_l x d_h) and gate sigmoid(x W_G,i).
    rope_theta: RoPE on the full d_h of queries and keys."""

    hidden_size: int
    num_heads: int
    num_q_groups: int
    num_k_heads: int
    num_c_groups: int
    head_dim: int
    latent_dim: int
    rope_theta: float = 10000.0

    def __post_init__(self):
        cls = "GTAConfig"
        for name in ("hidden_size", "num_heads", "num_q_groups", "num_k_heads", "num_c_groups", "head_dim",
                     "latent_dim"):
            check_positive_int(cls, name, getattr(self, name))
        _divides(cls, "num_q_groups", self.num_q_groups, "num_heads", self.num_heads)
        _divides(cls, "num_k_heads", self.num_k_heads, "num_q_groups", self.num_q_groups)
        _divides(cls, "num_c_groups", self.num_c_groups, "num_q_groups", self.num_q_groups)
        if self.latent_dim < self.head_dim:
            raise ValueError(f"{cls}: latent_dim ({self.latent_dim}) must be at least head_dim ({self.head_dim}): "
                             f"the latent is what every head's value is decoded from")
        if self.head_dim % 2:
            raise ValueError(f"{cls}: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"{cls}: rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_q_groups

    def kv_cache_elements_per_token(self) -> int:
        return self.num_k_heads * self.head_dim + self.num_c_groups * self.latent_dim

    def attention_flops(self, n: int) -> int:
        return n * n * self.num_q_groups * (self.head_dim + self.latent_dim)

    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return (h * self.num_q_groups * d + h * self.num_k_heads * d + h * self.num_c_groups * self.latent_dim
                + h * self.num_heads * d                      # W_G
                + self.num_heads * self.latent_dim * d        # W_P
                + self.num_heads * d * h)                     # W_O


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention: num_heads query heads of head_dim, num_kv_heads key/value
    heads (num_kv_heads == num_heads is multi-head attention, see MHAConfig)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            check_positive_int(cls, name, getattr(self, name))
        _divides(cls, "num_kv_heads", self.num_kv_heads, "num_heads", self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"{cls}: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"{cls}: rope_theta must be positive, got {self.rope_theta!r}")

    def kv_cache_elements_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def attention_flops(self, n: int) -> int:
        return n * n * self.num_heads * 2 * self.head_dim

    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2), the other latent-cache baseline: per token
    the cache holds one latent c_kv of kv_rank and one shared RoPE key of rope_dim; head i
    scores q_nope_i . (c_kv W_UK,i) + q_rope_i . k_rope over qk_nope_dim + rope_dim and reads
    values c_kv W_UV,i of v_head_dim. Decoding runs absorbed (q_nope_i W_UK,i^T against the
    cached latent, W_UV after attention), so the accounting counts that form:
    attention_flops(N) = N^2 n_h ((kv_rank + rope_dim) + kv_rank)."""

    hidden_size: int
    num_heads: int
    kv_rank: int
    qk_nope_dim: int
    rope_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0

    def __post_init__(self):
        cls = "MLAConfig"
        for name in ("hidden_size", "num_heads", "kv_rank", "qk_nope_dim", "rope_dim", "v_head_dim"):
            check_positive_int(cls, name, getattr(self, name))
        if self.rope_dim % 2:
            raise ValueError(f"{cls}: rope_dim must be even for RoPE, got {self.rope_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"{cls}: rope_theta must be positive, got {self.rope_theta!r}")

    def kv_cache_elements_per_token(self) -> int:
        return self.kv_rank + self.rope_dim

    def attention_flops(self, n: int) -> int:
        return n * n * self.num_heads * (2 * self.kv_rank + self.rope_dim)

    def attention_params(self) -> int:
        h, n = self.hidden_size, self.num_heads
        return (h * n * (self.qk_nope_dim + self.rope_dim) + h * self.kv_rank + h * self.rope_dim
                + n * self.kv_rank * (self.qk_nope_dim + self.v_head_dim) + n * self.v_head_dim * h)


def MHAConfig(hidden_size: int, num_heads: int, head_dim: int, rope_theta: float = 10000.0) -> GQAConfig:
    """Multi-head attention: GQA with one key/value head per query head."""
    return GQAConfig(hidden_size, num_heads, num_heads, head_dim, rope_theta)


# The 1B shape is the paper's (DESIGN 1). The 160M and 500M rows follow the same recipe
# (d_h 64, heads in query groups of 4, one key head, one latent of 2 d_h, GQA with one kv
# head per query group); the paper's exact 160M/500M dimensions were not available offline.
# MLA follows DeepSeek-V2's ratios: kv_rank 4 d_h, a shared RoPE key of d_h / 2.
PAPER_SHAPES = {
    "160M": dict(hidden_size=768, num_heads=12, num_q_groups=3, head_dim=64),
    "500M": dict(hidden_size=1024, num_heads=16, num_q_groups=4, head_dim=64),
    "1B": dict(hidden_size=1280, num_heads=20, num_q_groups=5, head_dim=64),
}


def paper_configs(name: str) -> dict:
    """{"MHA": ..., "GQA": ..., "MLA": ..., "GTA": ...} configs of one of PAPER_SHAPES."""
    if name not in PAPER_SHAPES:
        raise ValueError(f"paper_configs: name must be one of {sorted(PAPER_SHAPES)}, got {name!r}")
    s = PAPER_SHAPES[name]
    h, n, g, d = s["hidden_size"], s["num_heads"], s["num_q_groups"], s["head_dim"]
    return {
        "MHA": MHAConfig(h, n, d),
        "GQA": GQAConfig(h, n, g, d),
        "MLA": MLAConfig(h, n, 4 * d, d, d // 2, d),
        "GTA": GTAConfig(h, n, g, 1, 1, d, 2 * d),
    }


def accounting_table(n: int = 4096) -> list[dict]:
    """One row per (shape, attention): cache elements per token and layer, attention FLOPs
    per N^2, attention parameters per layer, and the ratios to GQA of the same shape."""
    rows = []
    for shape in PAPER_SHAPES:
        cfgs = paper_configs(shape)
        gqa = cfgs["GQA"]
        for kind, cfg in cfgs.items():
            rows.append(dict(
                shape=shape, attention=kind,
                kv_elements_per_token=cfg.kv_cache_elements_per_token(),
                flops_per_n2=cfg.attention_flops(n) // (n * n),
                attention_params=cfg.attention_params(),
                kv_vs_gqa=cfg.kv_cache_elements_per_token() / gqa.kv_cache_elements_per_token(),
                flops_vs_gqa=cfg.attention_flops(n) / gqa.attention_flops(n),
            ))
    return rows
