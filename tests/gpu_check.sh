#!/usr/bin/env bash
# GPU acceptance check: every CUDA path of the project once, one PASS/FAIL line each.
#
#   tests/gpu_check.sh                # on a machine with a GPU (uses one: CUDA_VISIBLE_DEVICES)
#   tests/gpu_check.sh --device cpu   # the same steps on the CPU with tiny settings (checks the
#                                     # script's commands; tests/test_gpu_check.py runs it)
#
# Runs from the repository it is in, with the Python it finds ($PYTHON, else python3), offline,
# installing nothing. Logs, generated data and checkpoints go to $OUT/gpu_check if OUT is set,
# else to a new temporary directory; the last line names it. Every step has a timeout; the exit
# status is the number of failed steps (0: all passed).
#
# One GPU means one process: SyncBatchNorm then takes its single-process path (no statistics
# exchanged) and DDP is a group of one; the multi-process paths are what the CPU suite's
# two-process gloo tests cover.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SCRIPT="$ROOT/tests/gpu_check.sh"
PY=${PYTHON:-python3}
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then
    DEVICE=${2:-}
    shift 2 || true
fi
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
    echo "usage: tests/gpu_check.sh [--device cpu]" >&2
    exit 2
fi
if [ -z "${GPU_CHECK_WORK:-}" ]; then  # (each step runs this script again, in the same place)
    if [ -n "${OUT:-}" ]; then
        GPU_CHECK_WORK="$OUT/gpu_check"
        mkdir -p "$GPU_CHECK_WORK"
    else
        GPU_CHECK_WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    fi
fi
WORK=$GPU_CHECK_WORK
LOGS="$WORK/logs"
mkdir -p "$LOGS"
DATA="$WORK/data"

if [ "$DEVICE" = cuda ]; then
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
    # ResNet-50 with the 8192-8192-8192 projector at 224 px (the defaults), 64 images a step
    MODEL=()
    EVAL_MODEL=()
    ARCH=resnet50
    TRAIN=(--batch-size 64 --workers 8 --print-freq 2)
    EVAL=(--batch-size 64 --workers 8)
    # the --fast run's shapes, so that the benchmark's compile finds the compiler's cache warm
    BENCH=(--batch-size 64 --steps 10 --warmup 5 --settings reference fast)
    FAST=(--fast)
    DEMO_SIZE="per_class=40, val_per_class=10"
    LONG=240 SHORT=120
else
    MODEL=(--arch resnet18 --cifar-stem --crop-size 16 --projector 32-32)
    EVAL_MODEL=(--arch resnet18 --cifar-stem --crop-size 16)
    ARCH=resnet18
    TRAIN=(--batch-size 8 --workers 0 --print-freq 1 --device cpu)
    EVAL=(--batch-size 8 --workers 0 --device cpu)
    BENCH=(--device cpu --arch resnet18 --projector 32-32 --batch-size 4 --crop-size 32
           --steps 1 --warmup 1 --settings reference fast-nocompile)
    # --compile takes minutes on a CPU: --fast's other settings
    FAST=(--precision bf16 --channels-last --lars-foreach --fast-augment)
    DEMO_SIZE="per_class=2, val_per_class=1, size=32"
    LONG=300 SHORT=300
fi

FAILED=0
# step NAME TIMEOUT COMMAND...: COMMAND (a program, or a function below: this script runs it,
# so that `timeout` stops it with all its processes), output in $LOGS/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    GPU_CHECK_WORK="$WORK" GPU_CHECK_INNER=1 timeout --kill-after 10 "$limit" \
        bash "$SCRIPT" --device "$DEVICE" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        echo "PASS $name (${took}s)"
    else
        local why="exit status $rc"
        [ $rc -eq 124 ] && why="timed out after ${limit}s"
        echo "FAIL $name ($why; log: $LOGS/$name.log)"
        tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'
        FAILED=$((FAILED + 1))
    fi
}

check_checkpoint() {  # DIR EPOCHS: checkpoint.pth after EPOCHS epochs, finite losses logged
    "$PY" - "$@" <<'PYTHON'
import json, math, sys, torch
ckdir, epochs = sys.argv[1], int(sys.argv[2])
ckpt = torch.load(f'{ckdir}/checkpoint.pth', map_location='cpu', weights_only=True)
assert ckpt['epoch'] == epochs, f"checkpoint epoch {ckpt['epoch']}, expected {epochs}"
lines = [json.loads(l) for l in open(f'{ckdir}/stats.txt') if l.startswith('{')]
stats = [s for s in lines if 'loss' in s]
assert stats and all(math.isfinite(s['loss']) for s in stats), stats
assert max(s['epoch'] for s in stats) == epochs - 1, 'no training step logged in the last epoch'
print('ok: epoch', ckpt['epoch'], len(stats), 'stats lines')
PYTHON
}

train_twice() {  # CKDIR FLAGS...: one epoch, then resumed for a second; checks both
    local ckdir=$1
    shift
    "$PY" main.py "$DATA" "${MODEL[@]}" "${TRAIN[@]}" --checkpoint-dir "$ckdir" --epochs 1 "$@" &&
        check_checkpoint "$ckdir" 1 &&
        "$PY" main.py "$DATA" "${MODEL[@]}" "${TRAIN[@]}" --checkpoint-dir "$ckdir" --epochs 2 "$@" &&
        check_checkpoint "$ckdir" 2 && test -s "$ckdir/$ARCH.pth"
}

cuda_tests() {  # the tests that skip without CUDA (their names contain "cuda")
    local out rc
    out=$("$PY" -m pytest -q -rs -k cuda tests/ 2>&1)
    rc=$?
    echo "$out"
    [ $rc -eq 0 ] || return $rc
    if [ "$DEVICE" = cuda ] && echo "$out" | grep -q "skipped"; then
        echo "a CUDA test was skipped on the GPU machine"
        return 1
    fi
    echo "$out" | grep -Eq "[0-9]+ (passed|skipped)"
}

device_jpeg_decode() {  # torchvision's decode_jpeg on the device; decode_and_crop_batch
    "$PY" - "$DATA" "$DEVICE" <<'PYTHON'
import pathlib, sys, torch, torchvision
import augmentations
files = sorted(pathlib.Path(sys.argv[1], 'train').rglob('*.JPEG'))[:8]
encoded = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
mode = torchvision.io.ImageReadMode.RGB
on_device = torchvision.io.decode_jpeg(encoded, mode=mode, device=sys.argv[2])  # no fallback
on_cpu = torchvision.io.decode_jpeg(encoded, mode=mode)
for a, b in zip(on_device, on_cpu):
    assert a.device.type == sys.argv[2] and a.shape == b.shape, (a.device, a.shape, b.shape)
    difference = (a.cpu().float() - b.float()).abs().mean().item()
    assert difference < 3, f'device decode differs from the CPU one by {difference:.2f} on average'
v1, v2 = augmentations.decode_and_crop_batch([f.read_bytes() for f in files], 32, sys.argv[2])
assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.device.type == sys.argv[2], v1.shape
print('ok', tuple(v1.shape), v1.dtype, v1.device)
PYTHON
}

hub() {  # torch.hub.load(..., source='local') of the trained weights, a forward pass on the device
    "$PY" - "$ROOT" "$WORK/default" "$ARCH" "$DEVICE" <<'PYTHON'
import sys, torch
root, ckdir, arch, device = sys.argv[1:]
if arch == 'resnet50':
    net = torch.hub.load(root, 'resnet50', source='local', weights=f'{ckdir}/resnet50.pth')
else:
    net = torch.hub.load(root, 'backbone', source='local', weights=f'{ckdir}/{arch}.pth',
                         arch=arch, cifar_stem=True)  # the CPU mode's model
full = torch.hub.load(root, 'barlowtwins', source='local', checkpoint=f'{ckdir}/checkpoint.pth')
net, full = net.to(device).eval(), full.to(device).eval()
side = 224 if arch == 'resnet50' else 32
with torch.no_grad():
    out = net(torch.randn(2, 3, side, side, device=device))
assert torch.isfinite(out).all(), out
print('ok', tuple(out.shape), sum(p.numel() for p in full.parameters()), 'parameters')
PYTHON
}

bench_table() {
    "$PY" bench.py "${BENCH[@]}" && "$PY" bench.py --knn-memory
}

if [ -n "${GPU_CHECK_INNER:-}" ]; then  # one step, as step() runs it
    "$@"
    exit $?
fi
if [ $# -gt 0 ]; then
    echo "usage: tests/gpu_check.sh [--device cpu]" >&2
    exit 2
fi

echo "gpu_check: $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1), device $DEVICE"
step data 120 "$PY" -c "import data; data.make_demo_dataset('$DATA', $DEMO_SIZE)"
step cuda-tests "$SHORT" cuda_tests
# the defaults: fp16 autocast with the gradient scaler, SyncBatchNorm, DDP; the kNN monitor at
# the end of the resumed run
step defaults-then-resume "$SHORT" train_twice "$WORK/default" --knn-every 2
step defaults-logged-knn 30 grep -q '"knn_top1_k20"' "$WORK/default/stats.txt"
if [ "$DEVICE" = cuda ]; then  # fp16 with the scaler: skipped updates are counted
    step defaults-logged-skipped-steps 30 grep -q '"skipped_steps"' "$WORK/default/stats.txt"
fi
step fast-then-resume "$LONG" train_twice "$WORK/fast" "${FAST[@]}" --drop-last
step fast-augment-then-resume "$SHORT" train_twice "$WORK/fast_augment" --fast-augment
step device-jpeg-decode 60 device_jpeg_decode
step evaluate-freeze "$SHORT" "$PY" evaluate.py "$DATA" "$WORK/default/$ARCH.pth" \
    "${EVAL_MODEL[@]}" "${EVAL[@]}" --epochs 1 --checkpoint-dir "$WORK/freeze"
step evaluate-finetune "$SHORT" "$PY" evaluate.py "$DATA" "$WORK/default/$ARCH.pth" \
    "${EVAL_MODEL[@]}" "${EVAL[@]}" --epochs 1 --weights finetune --lr-backbone 0.01 \
    --checkpoint-dir "$WORK/finetune"
step evaluate-knn "$SHORT" "$PY" evaluate.py "$DATA" "$WORK/default/checkpoint.pth" \
    "${EVAL_MODEL[@]}" "${EVAL[@]}" --knn --checkpoint-dir "$WORK/knn"
step torch-hub-local 90 hub
step bench-table "$LONG" bench_table
echo "gpu_check: $FAILED step(s) failed; logs in $LOGS"
exit "$FAILED"
