#!/usr/bin/env bash
# A prepared GPU check for one H100/H200, about 8 minutes in all (docs/results/gpu-check.md says how to run it):
#   1. the CUDA-only tests (tests/test_device.py, tests/test_resources.py: their CUDA cases skip without a GPU);
#   2. a one-epoch ResNet-18 teacher on 2,048 CIFAR-10 images (the cifar10-gpu preset's architecture), for the steps;
#   3. the KRR-ST and PAA steps at their cifar100-gpu presets' sizes on CIFAR-10, and the MKDT iteration at its
#      cifar10-gpu preset's sizes (ConvNet-3 w128, 256 images a step, 10 and 40 unrolled steps, with and without
#      checkpointing): seconds per step and peak CUDA memory;
#   4. the cifar10-gpu suite's teacher (`ssdd teacher --preset cifar10-gpu`) for the time that is left.
# Everything it prints goes to ONE results file, <folder>/gpu-check.txt; <folder> is the first argument, else $OUT,
# else ./gpu-check. Needs CIFAR-10 under $SSDD_DATA_ROOT and a CUDA torch; Python packages missing there (kornia) are
# installed from wheels in $GPU_CHECK_WHEELS when that folder exists. Each part has its own time limit and a
# failing part does not stop the others; the exit status is 1 when any part failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FOLDER="${1:-${OUT:-gpu-check}}"
BUDGET="${GPU_CHECK_SECONDS:-470}"  # the whole check's seconds; the cifar10-gpu teacher gets what is left
PY="${PYTHON:-python3}"  # the GPU image's python3 holds its CUDA torch; PYTHON=.venv/bin/python here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$FOLDER"
RESULTS="$FOLDER/gpu-check.txt"
WORK="$(mktemp -d)"
FAILED=0
: >"$RESULTS"

note() { echo "$*" | tee -a "$RESULTS"; }

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the results file
    local name="$1" limit="$2" start=$SECONDS rc
    shift 2
    note "== $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$RESULTS" 2>&1
    rc=$?
    note "-- $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
}

note "gpu_check: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ), python $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$RESULTS" 2>&1 || note "no nvidia-smi"
if [ -n "${GPU_CHECK_WHEELS:-}" ] && [ -d "$GPU_CHECK_WHEELS" ]; then
    part "wheels" 120 "$PY" -m pip install --quiet --no-index --find-links "$GPU_CHECK_WHEELS" kornia
fi
if ! "$PY" - >>"$RESULTS" 2>&1 <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: this torch has no CUDA device; the check needs one GPU")
import ssdd.methods  # noqa: F401 - every dependency (kornia included) imports
from ssdd.data import load_dataset
load_dataset("cifar10", "train")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
EOF
then
    note "gpu_check: cannot start (see above: a CUDA torch, ssdd's dependencies and CIFAR-10 under SSDD_DATA_ROOT)"
    exit 2
fi

part "cuda tests" 75 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device.py tests/test_resources.py

TEACHER="$WORK/quick-teacher"
part "quick teacher" 60 "$PY" -m ssdd teacher --preset cifar10-gpu --epochs 1 --train-images 2048 --device cuda \
    --no-progress --out "$TEACHER"
if [ -f "$TEACHER/teacher.safetensors" ]; then
    part "krr-st step (krr-st/cifar100-gpu on cifar10)" 90 "$PY" benchmarks/method_step.py \
        --preset krr-st/cifar100-gpu --dataset cifar10 --teacher "$TEACHER" --device cuda --steps 10 --warmup 3
    part "paa step (paa/cifar100-gpu on cifar10)" 100 "$PY" benchmarks/method_step.py \
        --preset paa/cifar100-gpu --dataset cifar10 --teacher "$TEACHER" --device cuda --steps 10 --warmup 3
else
    note "gpu_check: no quick teacher, so no KRR-ST / PAA step"
    FAILED=1
fi
part "mkdt iteration (mkdt/cifar10-gpu sizes)" 60 "$PY" benchmarks/unroll_memory.py --steps 10,40 --width 128 \
    --batch 256 --images 1000 --device cuda

LEFT=$((BUDGET - SECONDS))
if [ "$LEFT" -lt 60 ]; then LEFT=60; fi
part "cifar10-gpu teacher (${LEFT} s of it)" "$LEFT" "$PY" -m ssdd teacher --preset cifar10-gpu --device cuda \
    --no-progress --out "$WORK/cifar10-gpu-teacher"
note "cifar10-gpu teacher: its log and metrics so far"
cat "$WORK/cifar10-gpu-teacher/run.log" "$WORK/cifar10-gpu-teacher/metrics.jsonl" >>"$RESULTS" 2>&1
note "gpu_check: done in $SECONDS s, $([ "$FAILED" -eq 0 ] && echo 'every part passed' || echo 'a part FAILED')"
rm -rf "$WORK"
exit "$FAILED"
