#!/usr/bin/env bash
# The GPU check in one call: install the carried wheels (bench/wheels/, listed in bench/gpu_wheels.txt) with
# --no-deps and no index, then run bench/gpu_check.py on the GPU. Nothing comes from the network.
#
#   bench/gpu_check.sh --download     # here, where pip reaches PyPI: fetch the wheels for the GPU machine's Python
#   bench/gpu_check.sh [OUT]          # there, from the repository root: rows to OUT (default $OUT or gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${GPU_WHEELS:-bench/wheels}
names=$(grep -v '^#' bench/gpu_wheels.txt | sed '/^$/d')
python=${PYTHON:-python3}

if [ "${1:-}" = "--download" ]; then
  # The GPU image's Python (3.12, x86-64 manylinux); override with GPU_PYTHON_VERSION.
  mkdir -p "$wheels"
  for spec in $names; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
      --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "$spec"
  done
  ls "$wheels"
  exit 0
fi

missing=""
for spec in $names; do
  name=${spec%%==*}
  ls "$wheels/$name"-*.whl "$wheels/${name//_/-}"-*.whl >/dev/null 2>&1 || missing+=" $spec"
done
if [ -n "$missing" ]; then
  echo "error: $wheels/ lacks the wheels of$missing (run bench/gpu_check.sh --download where pip reaches PyPI)" >&2
  exit 2
fi
site=${TMPDIR:-/tmp}/foldwise-gpu-site
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "$wheels"/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
out=${1:-${OUT:-gpu_check_out}}
exec timeout 480 "$python" bench/gpu_check.py --out "$out"
