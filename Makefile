# The README's two commands. Both create .venv on first use (torch first, from the CPU wheel
# this machine's pip has, so the project's `torch>=2.2` never pulls a CUDA build).
PY := .venv/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'

install: $(PY)

demo: $(PY)
	$(PY) scripts/simulate.py

test: $(PY)
	$(PY) -m pytest

lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(PY)
	$(PY) scripts/bench_env.py

clean:
	rm -rf .venv outputs multirun .pytest_cache .hypothesis
