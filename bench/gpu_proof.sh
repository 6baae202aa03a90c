#!/usr/bin/env bash
# The GPU proof (issue 21): on a GPU machine, install what is missing, then run every CUDA check
# (conformance, Triton, allocation, the benchmark grid, the M sweep, NCCL data parallel) with
# time limits; results in bench/results/gpu-<device>/ and, when $OUT is set, in $OUT.
#
#   bash bench/gpu_proof.sh                   # on the GPU machine
#   bash bench/gpu_proof.sh --cpu-dry-run     # the same stages on CPU, tiny sizes, no installs
#   bash bench/gpu_proof.sh --fetch-wheels    # here: .whl/ for a GPU machine with no registry
#
# $PYTHON picks the interpreter (default python3: on a CUDA image, the one that has torch).
# Every option: bash bench/gpu_proof.sh --help  (bench/gpu_proof.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_proof.py "$@"
