#!/usr/bin/env bash
# The GPU leaderboard in one call of at most about ten minutes, on a GPU machine that may have
# no network: installs the bundled wheels, prints the training-throughput table, runs the
# ResNet-56 cifar10-jpeg sweep of benchmarks/gpu_window.toml one seed at a time with several
# runs sharing the GPU, and writes at most 7 files into the output folder, rewritten as
# results come in (see benchmarks/gpu_window.py and docs/performance.md).
#
#   bash benchmarks/prepare_gpu_window.sh          # once, on a machine with the data and pip
#   bash benchmarks/gpu_window.sh OUT              # on the GPU machine, from the repository root
#
# Settings (environment): OUT (the output folder when no argument is given), PYTHON
# (default python3), OFFLINE_DIR (default .offline: wheels/ and data/ from the prepare script),
# WINDOW_SECONDS (default 560: everything is written by then), WINDOW_CONFIG (default
# benchmarks/gpu_window.toml), RUNS_PER_GPU (overrides the config's), THROUGHPUT_ARGS and
# THROUGHPUT_SECONDS (the throughput table's arguments and time; 0 skips it), LATENCY_RUNTIME
# (default torch-cuda: PyTorch eager on the GPU; torch rehearses the latency phase on a CPU).
set -uo pipefail
START=$(date +%s)
OUT_DIR=${1:-${OUT:-gpu-window-out}}
PYTHON=${PYTHON:-python3}
OFFLINE_DIR=${OFFLINE_DIR:-.offline}
WINDOW_SECONDS=${WINDOW_SECONDS:-560}
WINDOW_CONFIG=${WINDOW_CONFIG:-benchmarks/gpu_window.toml}
SITE=${PRUNEBENCH_SITE:-/tmp/prunebench-site}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/window.log") 2>&1
echo "[window] start $(date -u +%FT%TZ); deadline in ${WINDOW_SECONDS}s; output in $OUT_DIR"

# 1. bundled wheels (torch-pruning, tensorly, setuptools), then this repository, into $SITE
if compgen -G "$OFFLINE_DIR/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$OFFLINE_DIR"/wheels/*.whl || { echo "[window] installing the bundled wheels failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" - <<'EOF'
import sys
from pathlib import Path
try:
    import prunebench
except ImportError:
    sys.exit(1)
sys.exit(0 if Path(prunebench.__file__).resolve().parent.parent == Path.cwd().resolve() else 1)
EOF
then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" . || { echo "[window] installing prunebench from $(pwd) failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. data bundled by the prepare script; caches on the local disk
if [ -d "$OFFLINE_DIR/data" ]; then export PRUNEBENCH_DATA=${PRUNEBENCH_DATA:-$(cd "$OFFLINE_DIR/data" && pwd)}; fi
export PRUNEBENCH_CACHE=${PRUNEBENCH_CACHE:-/tmp/prunebench-cache}
export PYTHONUNBUFFERED=1

# 3. throughput table, sweep, outputs (one hard deadline)
ARGS=(--out "$OUT_DIR" --deadline $((START + WINDOW_SECONDS)) --config "$WINDOW_CONFIG")
[ -n "${RUNS_PER_GPU:-}" ] && ARGS+=(--runs-per-gpu "$RUNS_PER_GPU")
[ -n "${THROUGHPUT_ARGS:-}" ] && ARGS+=(--throughput-args "$THROUGHPUT_ARGS")
[ -n "${THROUGHPUT_SECONDS:-}" ] && ARGS+=(--throughput-seconds "$THROUGHPUT_SECONDS")
[ -n "${WINDOW_RESULTS:-}" ] && ARGS+=(--results "$WINDOW_RESULTS")
[ -n "${LATENCY_RUNTIME:-}" ] && ARGS+=(--latency-runtime "$LATENCY_RUNTIME")
"$PYTHON" benchmarks/gpu_window.py "${ARGS[@]}"
STATUS=$?
echo "[window] end $(date -u +%FT%TZ) after $(( $(date +%s) - START ))s, status $STATUS"
exit $STATUS
