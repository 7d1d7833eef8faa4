#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py for what it runs and writes):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--budget SECONDS] [--only SECTION ...]
#   bash benchmarks/gpu_check.sh --plan        # sections and time limits, runs nothing
#
# OUT_DIR defaults to $OUT, else benchmarks/gpu_results/. Python: $PYTHON, else the repository's
# .venv, else python3 on PATH; the package is taken from src/ (no install needed).
# Without a CUDA device it stops at once with exit code 2.
set -u

# No cd: a relative OUT_DIR stays relative to the caller's folder (the driver uses absolute paths).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

# The driver keeps to its own budget (--budget, default 450 s) and gives every section its own
# limit; this outer limit is the backstop should the driver itself hang. On SIGTERM the driver
# stops the running section and still writes its reports.
hard_limit="${GPU_CHECK_HARD_LIMIT:-475}"
exec timeout --kill-after=15 "$hard_limit" "$py" "$root/benchmarks/gpu_check.py" "$@"
