#!/usr/bin/env bash
# servegym's prepared run for a lent GPU machine (bare: python3 with torch, triton, numpy, pytest,
# hypothesis; servegym itself and its other deps are NOT installed there).
#
#   bash scripts/gpu_check.sh                    # every section in SECTIONS, in order
#   bash scripts/gpu_check.sh kernel_tests       # only the named sections
#
# Logs go to $OUT (default ./gpu_out): one <section>.log each, plus summary.txt (exit code and seconds per
# section). A failing section does not stop the later ones. Expected total: about 3.5 minutes on an H100
# (measured 2026-11-26: env 11 s, kernel_tests 95 s (mostly Triton compiles), kernel_bench 38 s (now
# also times each decode call eagerly and graphed: expect ~50 s), model_bench 22 s; calibrate ~60 s, measured 2026-11-27 with two engine runs).
#
# To add a section: write a function `section_<name>` (run from the repo root, write under $OUT, keep
# it bounded with `timeout`), and add <name> to SECTIONS below.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python3}"
SECTIONS=(env kernel_tests kernel_bench model_bench calibrate)
mkdir -p "$OUT"
cd "$REPO"

# servegym is not installed there: a symlink named servegym to the checkout, on PYTHONPATH, makes
# servegym.envs/agents/kernels the repo's folders (servegym is a namespace package: no __init__.py).
SHIM="$(mktemp -d)"
ln -s "$REPO" "$SHIM/servegym"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

section_env() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
    "$PY" -c 'import servegym.kernels as k; print("servegym.kernels from", k.__file__, "triton:", k.triton_available())'
}

section_kernel_tests() {
    # test_triton.py runs the kernels on CUDA here (the interpreter variant skips itself on CUDA);
    # test_compile_variants.py checks that no engine batch compiles a kernel after ModelRunner is built.
    timeout 150 "$PY" -m pytest tests/kernels -o addopts= -q -rs -p no:cacheprovider --durations=8 \
        --junitxml="$OUT/kernel_tests.xml"
}

section_kernel_bench() {
    timeout 170 "$PY" scripts/bench_kernels.py --tune --budget-s 140 --out "$OUT"
}

section_model_bench() {
    # The 1B-shaped model in bf16: paged vs full-forward correctness, CUDA-graph decode at batch 64 x
    # context 2048 against the decode roofline, and a tight-KV engine run on the torch backend.
    timeout 300 "$PY" scripts/bench_model.py
}

section_calibrate() {
    # Profile the llama1b-shaped model (bf16) through the torch backend (a grid of isolated batches,
    # then every iteration of two engine runs of the fidelity workload on other seeds), fit the cost
    # model, write $OUT/llama1b_h100_fitted.yaml and $OUT/calibration_cuda_llama1b.json, then run the
    # fidelity workload twice on torch and once per profile on the sim (~60 s on an H100).
    timeout 420 "$PY" scripts/calibrate.py --device cuda --model llama1b --budget-s 60 \
        --out "$OUT/llama1b_h100_fitted.yaml" --json "$OUT/calibration_cuda_llama1b.json"
}

run_section() {
    local name="$1" start rc
    start=$(date +%s)
    echo "=== $name ($(date -u +%H:%M:%S) UTC)"
    "section_$name" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.log"
    printf '%-20s rc=%-4s %4ss\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$OUT/summary.txt"
    return "$rc"
}

[ "$#" -gt 0 ] && SECTIONS=("$@")
: >"$OUT/summary.txt"
status=0
for name in "${SECTIONS[@]}"; do
    if ! declare -F "section_$name" >/dev/null; then
        echo "unknown section '$name'; known: $(declare -F | sed -n 's/^declare -f section_//p' | tr '\n' ' ')"
        status=2
        continue
    fi
    run_section "$name" || status=1
done
rm -rf "$SHIM"
echo "=== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit "$status"
