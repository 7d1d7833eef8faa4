#!/usr/bin/env bash
# The main job on the embedded data: generate the synthetic dataset, train the small NAS-FPN
# RetinaNet on the CPU, evaluate it, and write curves and pictures to runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env.sh
. .venv/bin/activate
exec nasfpn demo --out "${1:-runs/demo}"
