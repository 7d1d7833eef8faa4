#!/usr/bin/env bash
# Static checks, as CI runs them before the tests: lint, format, types, import layers.
# Expects the environment of scripts/env.sh dev (scripts/test.sh runs it first).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
mypy
lint-imports
