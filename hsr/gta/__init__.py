"""GTA, Grouped-head latenT Attention (arXiv 2506.17286): configs with their accounting,
modules (GTA and the MHA/GQA baselines), compressed caches. Kernels: hsr.gta_attention."""

from .cache import GTACache, KVCache
from .config import PAPER_SHAPES, GQAConfig, GTAConfig, MHAConfig, accounting_table, paper_configs
from .modules import GQAAttention, GTAAttention, causal_mask, grouped_attention, rope

__all__ = [
    "GTAConfig", "GQAConfig", "MHAConfig", "PAPER_SHAPES", "paper_configs", "accounting_table",
    "GTAAttention", "GQAAttention", "GTACache", "KVCache", "rope", "causal_mask", "grouped_attention",
]
