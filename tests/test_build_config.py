"""The CMake configuration falls back to a CPU-only build, with a one-line notice, when no
CUDA compiler is available, and refuses HSR_CUDA=ON in that case."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake():
    try:
        import cmake  # the PyPI cmake package installed by `make test`

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("cmake")


pytestmark = pytest.mark.skipif(
    not (ROOT / "CMakeLists.txt").exists() or _cmake() is None, reason="needs the source tree and cmake"
)


def _configure(tmp_path, *defines):
    # A PATH without nvcc (and no CUDACXX): CMake cannot find a CUDA compiler.
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p) / "nvcc").exists())
    cmd = [_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
           *defines]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_no_nvcc_gives_cpu_only_build_with_notice(tmp_path):
    proc = _configure(tmp_path)
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in (proc.stdout + proc.stderr).splitlines() if "building CPU ops only" in line]
    assert notices == ["hsr: building CPU ops only (no CUDA compiler (nvcc) was found)."]
    assert "WITH_CUDA = False" in (tmp_path / "build" / "_build_info.py").read_text()


def test_hsr_cuda_on_without_nvcc_is_an_error(tmp_path):
    proc = _configure(tmp_path, "-DHSR_CUDA=ON")
    assert proc.returncode != 0
    assert "HSR_CUDA=ON but no CUDA compiler (nvcc) was found" in proc.stderr


def test_hsr_cuda_rejects_unknown_values(tmp_path):
    proc = _configure(tmp_path, "-DHSR_CUDA=maybe")
    assert proc.returncode != 0
    assert "HSR_CUDA must be AUTO, ON or OFF" in proc.stderr
