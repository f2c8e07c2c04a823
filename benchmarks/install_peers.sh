#!/usr/bin/env bash
# Installs the peer implementations used by benchmarks/*_ratios.py into a separate target dir
# (never into our venv: rebasin's own requirements would pull another torch). The benchmark puts
# this dir on PYTHONPATH only inside the peer's subprocess.
set -euo pipefail
PEER_DIR="${PYREBASIN_PEER_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.venv-rebasin/site}"
PY="${PYTHON:-python}"
mkdir -p "$PEER_DIR"
# rebasin 0.0.47 (snimu's Git Re-Basin port) imports torchview (graph tracing) and graphviz.
"$PY" -m pip install --no-deps --target "$PEER_DIR" rebasin==0.0.47 torchview graphviz
echo "peers installed in $PEER_DIR"
