#!/usr/bin/env bash
# GPU speed report: --fast against the original's settings, the step alone and end to end.
#
#   tests/gpu_perf.sh                # on a machine with a GPU: about 6 minutes on an H100/H200
#   tests/gpu_perf.sh --device cpu   # the same commands with tiny settings (checks the script;
#                                    # tests/test_gpu_perf.py runs it)
#   tests/gpu_perf.sh --only step,end-to-end   # some stages (names below)
#
# Stages, most important first, each under its own time limit, each appending its results to
# results.jsonl the moment they are measured (a stage stopped at its limit keeps what it had):
#   step        bench.py, the step alone (synthetic batches): reference, fast-nocompile, fast;
#               device time per region, compiler counts, a torch.profiler kernel breakdown
#   end-to-end  bench.py --end-to-end: main.py's loader (JPEG files, generated once) and its
#               training loop, reference and fast, three epochs each ending in a short batch
#   variants    the step with fast-ddp (DDP around the compiled step: the cost of its graph
#               splits) and fast-noaugment; end to end with fast-nocompile
# Then one summary table of everything measured. Output goes to $OUT/gpu_perf if OUT is set,
# else to a new temporary directory (the last line names it); generated images go to a
# temporary directory. Exit status: the number of stages that failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
ONLY=step,end-to-end,variants
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:-}; shift 2 || break ;;
        --only) ONLY=${2:-}; shift 2 || break ;;
        *) break ;;
    esac
done
USAGE="usage: tests/gpu_perf.sh [--device cpu] [--only STAGE,...] (stages: step, end-to-end, variants)"
if { [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; } || [ $# -gt 0 ]; then
    echo "$USAGE" >&2
    exit 2
fi
IFS=, read -r -a STAGES <<< "$ONLY"
for name in "${STAGES[@]}"; do
    case "$name" in
        step|end-to-end|variants) ;;
        *) echo "$USAGE" >&2; exit 2 ;;
    esac
done
wanted() {  # GROUP: whether --only names it
    local name
    for name in "${STAGES[@]}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}
if [ -n "${OUT:-}" ]; then
    WORK="$OUT/gpu_perf"
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_perf.XXXXXX")
fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_perf_images.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
RESULTS="$WORK/results.jsonl"
LOG="$WORK/bench.log"
: > "$RESULTS"

if [ "$DEVICE" = cuda ]; then
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    CPUS=$(nproc)
    MODEL=(--batch-size 256)  # ResNet-50, 8192-8192-8192, 224 px: bench.py's defaults
    STEP=(--steps 20 --warmup 10 --breakdown 3)
    E2E=(--generate 10000 --workers $((CPUS > 2 ? CPUS - 2 : 1)) --epochs 3 --skip-steps 5)
    STEP_LIMIT=270 E2E_LIMIT=150 VARIANT_LIMIT=150
    COMPILED=(fast)
else
    MODEL=(--device cpu --arch resnet18 --projector 32-32 --batch-size 4 --crop-size 32)
    STEP=(--steps 1 --warmup 1 --breakdown 1)
    E2E=(--generate 10 --workers 1 --epochs 2 --skip-steps 0)
    STEP_LIMIT=600 E2E_LIMIT=600 VARIANT_LIMIT=600
    COMPILED=()  # a CPU compile of even ResNet-18 takes minutes: the CPU suite tests it
fi

FAILED=0
# stage GROUP NAME LIMIT ARGS...: bench.py ARGS (if --only names GROUP), appended to bench.log
stage() {
    local group=$1 name=$2 limit=$3
    shift 3
    wanted "$group" || return 0
    local start=$SECONDS
    echo "=== $name: bench.py $*" >> "$LOG"
    set -o pipefail
    timeout --kill-after 10 "$limit" "$PY" bench.py "${MODEL[@]}" --log "$RESULTS" "$@" 2>&1 |
        tee -a "$LOG"
    local rc=$?
    set +o pipefail
    if [ $rc -eq 0 ]; then
        echo "PASS $name ($((SECONDS - start))s)"
    else
        local why="exit status $rc"
        [ $rc -eq 124 ] && why="timed out after ${limit}s"
        echo "FAIL $name ($why; log: $LOG)"
        FAILED=$((FAILED + 1))
    fi
}

echo "gpu_perf: $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1), $(nproc) CPUs, device $DEVICE"
stage step step "$STEP_LIMIT" "${STEP[@]}" --settings reference fast-nocompile "${COMPILED[@]}"
stage end-to-end end-to-end "$E2E_LIMIT" --end-to-end "${E2E[@]}" --work-dir "$SCRATCH" \
    --settings reference "${COMPILED[@]:-fast-nocompile}"
if [ "$DEVICE" = cuda ]; then
    stage variants variants-step "$VARIANT_LIMIT" --steps 20 --warmup 10 --settings fast-ddp fast-noaugment
    stage variants variants-end-to-end "$VARIANT_LIMIT" --end-to-end "${E2E[@]}" --work-dir "$SCRATCH" \
        --settings fast-nocompile
fi
echo
echo "Summary (every result in $RESULTS):"
"$PY" bench.py --summary "$RESULTS" | tee "$WORK/summary.md"
echo "gpu_perf: $FAILED stage(s) failed; results in $WORK"
exit "$FAILED"
