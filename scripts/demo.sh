#!/usr/bin/env bash
# Quick start: the main job, the demo on real data (installs what it needs). Writes out/demo/.
set -euo pipefail
PYREBASIN_EXTRAS=${PYREBASIN_EXTRAS:-data} source "$(dirname "$0")/env.sh"
pyrebasin demo --out "${1:-out/demo}"
