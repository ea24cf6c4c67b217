#!/usr/bin/env bash
# The accelerator check, from the repo root:
#
#   bash benchmarks/accelerator.sh --fetch-wheels   # here, once: the wheels the device lacks
#   bash benchmarks/accelerator.sh [FLAGS]          # on the accelerator machine (carry .whl)
#
# The accelerator image has jax (CUDA), flax, optax, orbax, einops, absl, PyYAML, pytest, but
# not ml_collections: --fetch-wheels downloads it into .whl/ (git-ignored) and the device run
# installs it into /tmp/site. The image's own flax is used: it matches the image's jax (the
# flax CI pins, 0.12.8, fails to import against jax 0.11.2 on the H100 image, 2026-11-27). FLAGS go to
# benchmarks/accelerator.py (--help lists them). Results: $OUT (else runs/accelerator)/
# accelerator.json and accelerator.md; the log is accelerator.log beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  pins=$(python3 -c 'import importlib.metadata as m; print("ml_collections==" + m.version("ml_collections"))')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl $pins
  ls -l .whl/*.whl
  exit 0
fi

if ! python3 -c 'import ml_collections' 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: ml_collections is not installed and .whl/ holds no wheels; run" \
      "'bash benchmarks/accelerator.sh --fetch-wheels' where pip can download, and carry .whl" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/ml_collections-*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Let JAX's allocator hold most of the GPU, so the largest batch it reports is the card's.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
out=${OUT:-runs/accelerator}
mkdir -p "$out"
python3 benchmarks/accelerator.py --out "$out" "$@" 2>&1 | tee "$out/accelerator.log"
