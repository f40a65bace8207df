# Two commands on a fresh machine: `make demo` (the main job on the built-in default) and `make test`.
# Both install what they need first. torch is installed explicitly, pinned, before the package: the package only
# asks for a range (torch>=2.4), which on a machine without torch would otherwise pull a multi-GB CUDA build.
PY ?= python3
TORCH_PIN ?= torch==2.13.0
# Without a GPU the Triton kernels run on the CPU under Triton's interpreter.
export TRITON_INTERPRET ?= $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)

.PHONY: setup demo test bench bench-e2e bench-quick gpu-check clean

.setup.stamp: pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: .setup.stamp

demo: setup
	$(PY) -m minillm_fast demo

test: setup
	$(PY) -m pytest -q tests

# The microbenchmarks (bench/README.md; hours on CPU for every op and mode), then the end-to-end bench (minutes).
bench: setup
	$(PY) -m bench
	$(PY) -m bench e2e

bench-e2e: setup
	$(PY) -m bench e2e

bench-quick: setup
	$(PY) -m bench --quick
	$(PY) -m bench e2e --quick

# The GPU verification (bench/README.md, "GPU check"): on a CUDA machine the whole suite, the native CUDA extension and
# the GPU bench (Liger-Kernel's headline shape first) in one command within 10 minutes, results under
# bench/results/gpu-check-<device>-<date>/; without CUDA one line and exit 2. No `setup` prerequisite, on purpose: a
# GPU machine may have no network and its own CUDA build of torch, and `setup` pip-installs. gpu_check runs from the
# checkout as it is (for its stages it maps minillm_fast.kernels to kernels/ where the package is not installed) and
# skips, saying so, whatever is missing (pytest, Triton, Liger-Kernel, nvcc). Options: GPU_CHECK_ARGS="--budget 900"
# (seconds), "--stages ...", "--archive FILE.tar.gz"; `$(PY) -m bench.gpu_check --help` lists them.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf .setup.stamp build *.egg-info .pytest_cache
