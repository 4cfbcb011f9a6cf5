#!/usr/bin/env bash
# The GPU check (benchmarks/README.md, "GPU check"): one run of at most 8 minutes on one CUDA GPU
# that writes gpu_check.json (to $OUT when set, else bench-results/gpu-check/).
#
#   scripts/gpu_check.sh --dry-run   # here, before a GPU is lent: fetches and trims the wheels into
#                                    # gpu-wheels/, checks what travels is under 64 MiB, runs every
#                                    # step up to where CUDA is needed (tiny shapes, on CPU)
#   scripts/gpu_check.sh             # on the GPU machine (Python 3.12 with torch + CUDA, no network)
#
# Python: $PYTHON if set; else the project's .venv for --dry-run, the machine's python3 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ " $* " == *" --dry-run "* && -x .venv/bin/python ]]; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
