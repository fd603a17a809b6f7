"""GTA, Grouped-head latenT Attention (arXiv 2506.17286): configs with their accounting,
modules (GTA and the MHA/GQA/MLA baselines), compressed caches. Kernels: hsr.gta_attention."""

from ..buffers import KVCache
from .cache import GTACache, MLACache
from .config import PAPER_SHAPES, GQAConfig, GTAConfig, MHAConfig, MLAConfig, accounting_table, paper_configs
from .modules import GQAAttention, GTAAttention, MLAAttention, causal_mask, grouped_attention, rope

__all__ = [
    "GTAConfig", "GQAConfig", "MHAConfig", "MLAConfig", "PAPER_SHAPES", "paper_configs", "accounting_table",
    "GTAAttention", "GQAAttention", "MLAAttention", "GTACache", "KVCache", "MLACache", "rope", "causal_mask",
    "grouped_attention",
]
