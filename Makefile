# Two commands do everything on a fresh clone (they create .venv with the pinned versions):
#   make run    the main job (see README)
#   make test   the test suite (Triton kernels run under the interpreter on the CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench wheels check-cuda-build clean

$(VENV)/.ready: requirements-dev.txt requirements-nodeps.txt pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

run: $(VENV)/.ready
	$(PY) -m tic_kernels.train

# the adapters' frameworks are installed above: their tests must run, not skip
test: $(VENV)/.ready
	TRITON_INTERPRET=1 TIC_KERNELS_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -n auto --dist worksteal --durations=20 tests

# CPU benchmarks against the peers (installs trl, liger-kernel and matplotlib into .venv)
bench: $(VENV)/.ready
	$(PY) -m pip install -q trl liger-kernel==0.8.5 matplotlib
	$(PY) benchmarks/run.py --device cpu --quick
	$(PY) benchmarks/report.py

# peers' pure-Python wheels for the GPU machine (no package index there): Liger-Kernel,
# flash-attn's Python parts (its Triton cross_entropy) and Apple's Cut Cross-Entropy (the
# fused LM head's peer); carried as .whl/ by the device tool
wheels: $(VENV)/.ready
	mkdir -p .whl
	$(PY) -m pip install -q packaging psutil ninja einops
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE $(PY) -m pip wheel -q \
		--no-build-isolation --no-deps flash-attn==2.8.3.post2 -w .whl
	$(PY) -m pip download -q --no-deps liger-kernel==0.8.5 -d .whl
	$(PY) -m pip download -q --no-deps cut-cross-entropy==25.1.1 -d .whl

# compiles csrc/*.cu against the CUDA build of torch (CI runs it; needs nvcc, not a GPU)
check-cuda-build:
	bash scripts/check_cuda_build.sh

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info tic_kernels/*.so
