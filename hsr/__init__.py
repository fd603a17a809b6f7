"""hsr: sparse attention over a half-space reporting index of the KV cache, for PyTorch."""

from ._loader import TorchVersionMismatch, load_library

_build_info = load_library()

from .index import (  # noqa: E402
    HSRIndex,
    HSRIndexBatch,
    IndexStats,
    KeyStats,
    expected_reported_fraction,
    paper_threshold,
    read_index,
    write_index,
)
from .ops import attention, gta_attention, merge_attention, sparse_attention  # noqa: E402
from .sketch import KeySketch  # noqa: E402
from .kvcache import DecodeInfo, HSRKVCache, ReLU, Softmax, TopK  # noqa: E402
from .certified import (CertifiedInfo, ReportedInfo, certified_attention, fixed_set_attention,  # noqa: E402
                        relu_reported_attention, relu_sketch_attention, threshold_attention, topk_attention)

__version__ = "0.1.0"
built_with_torch = _build_info.TORCH_VERSION
built_with_cuda = bool(_build_info.WITH_CUDA)

__all__ = [
    "attention", "sparse_attention", "merge_attention", "gta_attention",
    "certified_attention", "fixed_set_attention", "threshold_attention", "topk_attention", "CertifiedInfo",
    "relu_reported_attention", "relu_sketch_attention", "ReportedInfo",
    "HSRKVCache", "Softmax", "ReLU", "TopK", "DecodeInfo", "KeySketch",
    "HSRIndex", "HSRIndexBatch", "IndexStats", "KeyStats", "paper_threshold", "expected_reported_fraction",
    "read_index", "write_index", "TorchVersionMismatch", "built_with_torch", "built_with_cuda", "__version__",
]
