#!/usr/bin/env bash
# Static checks, as CI runs them before the tests: lint, format, types, import layers and cycles.
# Expects the environment of `scripts/env.sh dev` (scripts/test.sh runs it first).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "check: ruff lint"
ruff check src tests benchmarks examples
echo "check: ruff format"
ruff format --check src tests benchmarks examples
echo "check: mypy"
mypy
echo "check: import layers and cycles"
lint-imports --no-cache
