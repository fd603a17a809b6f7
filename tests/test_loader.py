import shutil
import subprocess
import sys

import pytest
import torch

import hsr
from hsr._loader import TorchVersionMismatch, check_torch_version


def test_build_record_matches_running_torch():
    assert hsr.built_with_torch == torch.__version__


def test_ops_are_registered():
    assert hasattr(torch.ops.hsr, "attention")


def test_check_torch_version_accepts_exact_match():
    check_torch_version("2.11.0+cu130", "2.11.0+cu130")


@pytest.mark.parametrize("running", ["2.12.0+cu130", "2.11.0+cpu", "2.11.0"])
def test_check_torch_version_refuses_anything_else(running):
    with pytest.raises(TorchVersionMismatch, match="compiled against torch 2.11.0\\+cu130"):
        check_torch_version("2.11.0+cu130", running)


def test_import_refuses_another_torch_in_a_fresh_interpreter():
    # Pretend the installed torch is another release: importing hsr must fail before the
    # shared library is loaded, with a message that says what to do.
    code = "import torch; torch.__version__ = '9.9.9'; import hsr"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
    assert "TorchVersionMismatch" in proc.stderr
    assert "torch 9.9.9 is installed" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf")
def test_module_uses_the_shared_cxx_runtime():
    # A second, static C++ runtime in the module (a compiler that ships only libstdc++.a)
    # crashed the first error message that formatted a number; the build names the shared one.
    from hsr._loader import library_path

    dynamic = subprocess.run(["readelf", "-d", library_path()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed
