"""Loads the compiled operator library, refusing a torch it was not built against."""

from __future__ import annotations

import glob
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class TorchVersionMismatch(ImportError):
    """The installed torch is not the one hsr's extension was compiled against."""


def check_torch_version(built_with: str, running: str) -> None:
    """Raise TorchVersionMismatch unless ``running`` is exactly the torch ``built_with``.

    The extension links against torch's C++ libraries, whose ABI changes between releases
    (and between CPU and CUDA builds of one release), so anything but an exact match can
    crash at load time or, worse, later.
    """
    if built_with != running:
        raise TorchVersionMismatch(
            f"hsr was compiled against torch {built_with}, but torch {running} is installed. "
            f"Install torch=={built_with} or rebuild hsr against this torch with "
            "`pip install --no-build-isolation .` from the hsr source tree."
        )


def library_path() -> str:
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_hsr_ops*.so")))
    if not candidates:
        raise ImportError(
            f"hsr's compiled extension (_hsr_ops.so) is not in {_PACKAGE_DIR}. Build it with "
            "`pip install --no-build-isolation .` or, for an in-place build, `make inplace`."
        )
    return candidates[0]


def load_library():
    """Check the torch version, load the ops into torch.ops.hsr and return the build record."""
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(
            "hsr's build record (hsr/_build_info.py) is missing: the extension was not built. "
            "Build it with `pip install --no-build-isolation .` or `make inplace`."
        ) from exc
    check_torch_version(_build_info.TORCH_VERSION, torch.__version__)
    torch.ops.load_library(library_path())
    return _build_info
