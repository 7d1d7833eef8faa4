#!/usr/bin/env bash
# The test suite (installs what it needs first): static checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env.sh dev
. .venv/bin/activate
scripts/check.sh
exec python -m pytest -q -m "not slow" "$@"
