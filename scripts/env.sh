# Sourced by the Quick start scripts: create/reuse .venv, install the pinned CPU torch FIRST (a bare
# `torch` requirement would pull several GB of CUDA wheels), then pyrebasin with its native extension.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q --no-build-isolation -e ".[${PYREBASIN_EXTRAS:-test}]" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
