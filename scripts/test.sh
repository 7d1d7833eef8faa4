#!/usr/bin/env bash
# The test suite (installs what it needs first): static checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env.sh dev
# The web page's test runs in a headless Chromium where there is one: install it if this machine can.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 ||
    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) ||
    echo "note: chromium could not be installed; the browser test of the web page is skipped"
fi
. .venv/bin/activate
scripts/check.sh
exec python -m pytest -q -m "not slow" "$@"
