# Two commands on a fresh machine: `make demo` (the main job on the built-in default) and `make test`.
# Both install what they need first. torch is installed explicitly, pinned, before the package: the package only
# asks for a range (torch>=2.4), which on a machine without torch would otherwise pull a multi-GB CUDA build.
PY ?= python3
TORCH_PIN ?= torch==2.13.0
# Without a GPU the Triton kernels run on the CPU under Triton's interpreter.
export TRITON_INTERPRET ?= $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)

.PHONY: setup demo test bench bench-e2e bench-quick clean

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

clean:
	rm -rf .setup.stamp build *.egg-info .pytest_cache
