#!/usr/bin/env bash
# The prepared GPU check: run once on a fresh machine with one CUDA GPU (made for an H100; PyTorch preinstalled,
# Python 3.12, no internet, this repository copied in). Finishes within 8 minutes and writes
# benchmarks/results/gpu_check_<gpu>.{json,md}: forward time / peak memory at S = 2..200, bf16-vs-fp32 accuracy,
# one bias-tuning step with gradient checkpointing, and extreme-poses end to end (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # here, on CPU, tiny models (seconds; the test-suite runs it)
#
# Packages the machine lacks come as wheels, from $NS_EXTREME_WHEELS (default: benchmarks/wheels/, never committed).
# Prepare that folder on a machine with internet and the same Python (3.12) and platform:
#
#   pip download --dest benchmarks/wheels --python-version 3.12 --platform manylinux2014_x86_64 \
#       --only-binary=:all: safetensors huggingface_hub tyro scipy pillow tqdm rich plyfile pycolmap av
#   pip wheel --no-deps --wheel-dir benchmarks/wheels .        # ns_extreme itself (optional: PYTHONPATH works too)
#
# (nerfstudio is optional for this check: without it `ns-process-data` cannot run and the posing section is
# recorded as failed with the reason; the other sections run.) Installation is offline (--no-index) and
# best-effort: what could not be installed is listed in the results file's "setup" log.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${NS_EXTREME_WHEELS:-benchmarks/wheels}"
LOG="$(mktemp -t ns_extreme_gpu_check_setup.XXXXXX)"
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

{
  echo "python: $($PY --version 2>&1); torch: $($PY -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "$DRY" = 1 ]; then
    echo "dry run: nothing installed"
  elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    for whl in "$WHEELS"/*.whl; do
      if $PY -m pip install --no-index --find-links "$WHEELS" --no-deps --quiet "$whl" 2>/dev/null; then
        echo "installed $(basename "$whl")"
      else
        echo "SKIPPED $(basename "$whl") (pip could not install it offline)"
      fi
    done
  else
    echo "no wheel folder ($WHEELS): using what is installed"
  fi
  if [ "$DRY" = 0 ]; then
    for mod in safetensors huggingface_hub tyro scipy PIL tqdm rich plyfile pycolmap av nerfstudio; do
      $PY -c "import $mod" 2>/dev/null && echo "import $mod: ok" || echo "import $mod: MISSING"
    done
  fi
} >"$LOG" 2>&1
cat "$LOG"

if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  LIMIT=120
else
  LIMIT=450 # the script's own budget is 420 s; setup above takes seconds
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$LIMIT" "$PY" benchmarks/gpu_check.py --setup-log "$LOG" "$@"
rc=$?
rm -f "$LOG"
[ $rc = 124 ] && echo "gpu_check: stopped after ${LIMIT} s (results of the finished sections were not written)" >&2
exit $rc
