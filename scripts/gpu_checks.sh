#!/usr/bin/env bash
# The GPU checks in one run: the `gpu`-marked tests (the GPU training recipe, DDP device choice,
# ...), the engine's whole test suite with a GPU present (device "auto" then means CUDA; off by
# default: ENGINE_TESTS=1 runs it), and benchmarks/bench_gpu.py, whose ISBI part trains the GPU
# recipe for 300 s (target: pixel error <= 0.062 on slices 20-23). About 10 minutes in all.
# Logs and gpu.json go to ${OUT:-gpu-checks}/. Qt tests are left to the CPU CI.
#   bash scripts/gpu_checks.sh [ISBI_FOLDER]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# A GPU machine without a package index may lack zarr and dask (tests/io/ and tests/inference/
# import them): carry their wheels in .whl/, downloaded beside the checkout with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr numcodecs donfig crc32c google-crc32c dask partd locket
if [ -d .whl ]; then  # wheels carried to a machine without a package index
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
status=0
timeout 240 $PY -m pytest tests --ignore=tests/_qt -m gpu -v -rs 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed" || status=1
if [ "${ENGINE_TESTS:-0}" != 0 ]; then  # the whole engine suite does not fit a 15-minute device budget beside the rest
    timeout 240 $PY -m pytest tests --ignore=tests/_qt -q -n 8 2>&1 | tee "$OUT/engine_tests.log" | tail -25 || status=1
fi
ISBI=${1:-}
timeout 480 $PY benchmarks/bench_gpu.py --compile --output "$OUT/gpu.json" ${ISBI:+--isbi "$ISBI"} 2>&1 | tee "$OUT/bench_gpu.log" || status=1
exit $status
