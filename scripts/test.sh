#!/usr/bin/env bash
# Quick start: run the test suite (installs what it needs). Fails if the native extension did not build.
set -euo pipefail
source "$(dirname "$0")/env.sh"
export PYREBASIN_REQUIRE_NATIVE=1
python -c "import pyrebasin; assert pyrebasin.native_available()"
python -c "import torch; print('CPU kernels:', torch.backends.cpu.get_cpu_capability())"
python -m pytest -q -p no:cacheprovider "$@"
