#!/usr/bin/env bash
# Bundle what benchmarks/gpu_window.sh needs on a GPU machine without network access into the
# git-ignored folder .offline/ (about 33 MB), next to this repository's files:
#
#   .offline/wheels/   torch-pruning, tensorly and setuptools wheels (pure Python; the GPU
#                      machine is assumed to have Python 3.12, torch, torchvision, numpy, scipy,
#                      pandas, scikit-learn, typer, rich and tabulate)
#   .offline/data/     cifar10-jpeg.tar.gz and pretrained/resnet56-4bfd9763.th with its licence,
#                      copied from $PRUNEBENCH_DATA
#
# Run from the repository root, with PRUNEBENCH_DATA set and pip able to reach the index:
#
#   PRUNEBENCH_DATA=/path/to/data bash benchmarks/prepare_gpu_window.sh
#
# Then copy the repository with .offline/ to the GPU machine and run, from its root,
#   bash benchmarks/gpu_window.sh OUT
# Settings: PYTHON (default .venv/bin/python, else python3: the pip that downloads and the
# versions to pin), OFFLINE_DIR (default .offline), PY_VERSION (the GPU machine's Python,
# default 3.12), NO_WHEELS=1 (data only).
set -euo pipefail
OFFLINE_DIR=${OFFLINE_DIR:-.offline}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY_VERSION=${PY_VERSION:-3.12}
: "${PRUNEBENCH_DATA:?set PRUNEBENCH_DATA to the folder holding cifar10-jpeg.tar.gz and pretrained/}"
ARCHIVE="$PRUNEBENCH_DATA/cifar10-jpeg.tar.gz"
CHECKPOINT="$PRUNEBENCH_DATA/pretrained/resnet56-4bfd9763.th"
LICENCE="$PRUNEBENCH_DATA/pretrained/LICENSE-pytorch_resnet_cifar10"
for f in "$ARCHIVE" "$CHECKPOINT" "$LICENCE"; do
  [ -f "$f" ] || { echo "missing $f (expected in PRUNEBENCH_DATA=$PRUNEBENCH_DATA)" >&2; exit 1; }
done

mkdir -p "$OFFLINE_DIR/data/pretrained"
cp "$ARCHIVE" "$OFFLINE_DIR/data/"
cp "$CHECKPOINT" "$LICENCE" "$OFFLINE_DIR/data/pretrained/"

if [ -z "${NO_WHEELS:-}" ]; then
  # the versions this environment runs, so the GPU machine runs the same ones
  read -r TP TL ST < <("$PYTHON" -c "
import setuptools, tensorly, torch_pruning
print(torch_pruning.__version__, tensorly.__version__, setuptools.__version__)")
  rm -rf "$OFFLINE_DIR/wheels" && mkdir -p "$OFFLINE_DIR/wheels"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OFFLINE_DIR/wheels" "torch-pruning==$TP" "tensorly==$TL" "setuptools==$ST"
fi

echo "bundled in $OFFLINE_DIR ($(du -sh "$OFFLINE_DIR" | cut -f1)):"
find "$OFFLINE_DIR" -type f | sort | sed 's/^/  /'
echo "on the GPU machine, from the repository root: bash benchmarks/gpu_window.sh OUT"
