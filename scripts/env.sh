#!/usr/bin/env bash
# Create (or reuse) .venv and install nasfpn with the pinned, tested dependency set.
# Usage: scripts/env.sh [extras]   e.g. scripts/env.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# requirements/pinned.txt is the tested set; pyproject.toml declares the supported ranges.
python -m pip install -q -c requirements/pinned.txt -e "$spec"
