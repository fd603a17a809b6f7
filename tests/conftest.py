import os

import pytest
import torch

import hsr


def pytest_report_header(config):
    return [
        f"hsr {hsr.__version__} from {os.path.dirname(hsr.__file__)}",
        f"built with torch {hsr.built_with_torch}, CUDA kernels: {hsr.built_with_cuda}; "
        f"running torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}",
    ]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and hsr.built_with_cuda:
        return
    reason = "no CUDA device" if hsr.built_with_cuda else "hsr built without CUDA kernels"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
