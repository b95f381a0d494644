# The README's two commands. Both create .venv on first use with the train, dev and triton extras
# (torch first, from the CPU wheel this machine's pip has, so the train extra's `torch>=2.2` never
# pulls a CUDA build).
PY := .venv/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install demo simulate test test-fast lint typecheck bench clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[train,dev,triton]'

install: $(PY)

# The main job: train a small policy (simulated backend, CPU), export it, compare it with the
# heuristics on held-out seeds, print the table and where the ONNX file and plots are.
demo: $(PY)
	$(PY) scripts/train.py experiment=quick

simulate: $(PY)
	$(PY) scripts/simulate.py

test: $(PY)
	$(PY) -m pytest

# Everything but the tests marked slow (soaks, training runs, real scripts), on two workers
# (pytest-xdist, in the dev extra; installed here too for a .venv made before it was): under a
# minute on 2 cores. `make test` runs everything in one process, as CI does.
test-fast: $(PY)
	@$(PY) -c "import xdist" 2>/dev/null || $(PY) -m pip install -q "pytest-xdist>=3.5"
	$(PY) -m pytest -m "not slow" -n 2

lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# mypy, configured in pyproject.toml ([tool.mypy]: strict on the engine and the workloads). The
# code imports as servegym.* from envs/, agents/ and kernels/ (package-dir), which no search path
# shows mypy, so it reads servegym.* through the link .typecheck/servegym -> .. (made here).
typecheck: $(PY)
	@mkdir -p .typecheck && ln -sfn .. .typecheck/servegym
	$(PY) -m mypy

bench: $(PY)
	$(PY) scripts/bench_env.py

clean:
	rm -rf .venv outputs multirun .pytest_cache .hypothesis .mypy_cache .typecheck

# vLLM adapter tests against real vLLM (CPU build) in their own venv, .venv-vllm (scripts/setup_vllm.sh:
# 2 min 47 s and 4.0 GB the first time, measured 2026-12-03 on 2 cores), including `vllm serve` with
# the exported scheduler and a replay over HTTP (tests/vllm_adapter/test_vllm_serve.py, ~75 s).
# `make test` skips these tests.
.PHONY: test-vllm
test-vllm:
	bash scripts/setup_vllm.sh
	.venv-vllm/bin/python -m pytest tests/vllm_adapter
