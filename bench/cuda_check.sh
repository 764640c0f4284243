#!/usr/bin/env bash
# The CUDA path, run and timed on a GPU machine in one call (a few minutes on one H100):
#
#   bash bench/cuda_check.sh                                    # on the GPU machine
#   DEVICE=cpu PER_CLASS=100,10 EPOCHS=2 STEPS=3 WHEELS=none bash bench/cuda_check.sh   # dry run on a CPU
#
# 1. MLflow and the packages it needs that the machine lacks, from wheels in .whl/ (a machine without
#    network; `pip download` them here, see docs/benchmarks.md), into /tmp/site.
# 2. The full-size CIFAR-100-format folder, written on the machine (bench/cifar_full_size.py).
# 3. bench/train_throughput.py: ResNet-32 images per second, ours beside the torchvision reference,
#    bf16 autocast, then torch.compile'd (one round, the reference and ours channels_last).
# 4. bench/experts_at_once.py on cifar100-lt: the experts stage at once and one after another, bf16,
#    then with --compile.
# 5. bench/cifar_full_size.py: the whole pipeline for EPOCHS epochs, every run FINISHED, the champion
#    registered and served one request.
#
# Each step has its own time limit and its output goes to $OUT (or /tmp/argse-cuda-check) as well; a
# step that fails or runs out of time is reported and the next one runs. The steps the acceptance
# needs come first.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-500,100}
EPOCHS=${EPOCHS:-5}
STEPS=${STEPS:-50}
WORKERS=${WORKERS:-8}
WHEELS=${WHEELS:-.whl}  # WHEELS=none: use the Python environment as it is
DEADLINE=${DEADLINE:-470}  # seconds for the whole script: no step runs past it
ONLY=${ONLY:-}  # e.g. ONLY="throughput pipeline": run only these steps
DATA=${DATA:-/tmp/argse-cifar100-full-${PER_CLASS/,/-}}
RESULTS=${OUT:-/tmp/argse-cuda-check}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
started=$SECONDS

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "installing the wheels in $WHEELS/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
    echo "wheels installed from $WHEELS/: $(du -sh "$WHEELS" | cut -f1) ($(ls "$WHEELS"/*.whl | wc -l) files)"
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to the screen and $RESULTS/NAME.txt
    local name=$1 limit=$2 left=$((DEADLINE - (SECONDS - started)))
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if [ "$left" -lt 20 ]; then
        echo; echo "=== $name: skipped, $left s left of the script's $DEADLINE s"; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    echo "=== $name (at $((SECONDS - started)) s, limit $limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
try:
    import mlflow
    print(f"mlflow {mlflow.__version__}")
except Exception as exc:  # reported, the timing steps still run
    print(f"MLflow cannot be imported ({exc}): the steps that track runs will fail")
EOF

step folder 120 python3 bench/cifar_full_size.py --write-only --per-class "$PER_CLASS" --data-dir "$DATA"
step throughput 120 python3 bench/train_throughput.py --device "$DEVICE" --steps "$STEPS" --workers "$WORKERS"
step experts 150 python3 bench/experts_at_once.py --dataset cifar100-lt --data-dir "$DATA" --device "$DEVICE" --epochs "$EPOCHS"
step pipeline 200 python3 bench/cifar_full_size.py --epochs "$EPOCHS" --device "$DEVICE" --data-dir "$DATA"
step throughput-compile 120 python3 bench/train_throughput.py --device "$DEVICE" --steps "$STEPS" --workers "$WORKERS" --rounds 1 --compile --rows 3
step experts-compile 150 python3 bench/experts_at_once.py --dataset cifar100-lt --data-dir "$DATA" --device "$DEVICE" --epochs "$EPOCHS" --compile
# Beyond the recipe (run with ONLY=...): what a larger batch and CUDA graphs would give.
if [ -n "$ONLY" ]; then
    step throughput-batch512 120 python3 bench/train_throughput.py --device "$DEVICE" --steps "$STEPS" --workers "$WORKERS" --rows 3 --batch-size 512
    step throughput-graphs 150 python3 bench/train_throughput.py --device "$DEVICE" --steps "$STEPS" --workers "$WORKERS" --rounds 1 --compile --compile-mode reduce-overhead --rows 3
fi
echo
echo "all steps done in $((SECONDS - started)) s"
