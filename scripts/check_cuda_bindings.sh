#!/usr/bin/env bash
# Compile-checks the torch-facing CUDA bindings (csrc/cuda/*_binding.cpp) without a GPU or a CUDA torch:
# builds every object of the CUDA extension against CUDA-enabled torch headers, then checks the links.
#
# Usage: scripts/check_cuda_bindings.sh [TORCH_CUDA_INCLUDE_DIR [CUDA_LIBS_INCLUDE_DIR]]
#   TORCH_CUDA_INCLUDE_DIR  a torch/include folder from a CUDA torch wheel (must hold c10/cuda/CUDAGuard.h).
#   CUDA_LIBS_INCLUDE_DIR   where cusparse.h, cublas_v2.h, cusolverDn.h are (default $CUDA_HOME/include).
#   Without arguments: ~/.cache/pyrebasin/torch-cuda-headers/<torch version>/{include,cuda-libs-include},
#   fetched once from PyPI (the CUDA torch wheel + the cuBLAS/cuSPARSE/cuSOLVER wheels it pins, ~1.4 GB
#   transient; only headers are kept, ~60 MB; nothing is installed).
# Env: PYTHON (default: python3; gives the torch version and the Python include dir),
#      TORCH_VERSION (default: the installed torch's, without +cpu), CUDA_HOME (default /usr/local/cuda),
#      CXX (default g++), JOBS (parallel compiles, default 2), KEEP_BUILD=1 keeps the object folder,
#      CUDA_ONLY=1 compiles only csrc/cuda/* (the CPU build covers csrc/cpu/*.cpp, csrc/ops.cpp).
# Steps: nvcc -c every csrc/cuda/*.cu; g++ -c every csrc/cuda/*.cpp, csrc/cpu/*.cpp, csrc/*.cpp with the
# flags torch.utils.cpp_extension would pass; then every undefined pyrebasin:: symbol of any object
# must be defined (same mangled name, so same signature) by some object — a binding's declaration of
# *_cuda_launch that drifted from its .cu definition otherwise shows only when the .so is loaded.
# Exits non-zero on any error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
CXX="${CXX:-g++}"
JOBS="${JOBS:-2}"
NVCC="$CUDA_HOME/bin/nvcc"
[[ -x "$NVCC" ]] || { echo "error: no nvcc at $NVCC (set CUDA_HOME)" >&2; exit 2; }

t_start=$(date +%s)

# --- 1. CUDA torch headers (+ cuBLAS/cuSPARSE/cuSOLVER headers, which ATen/cuda/CUDAContext.h needs) ---
# pip with an empty config: the local pip config may point at a CPU-only wheel folder.
pip_download() {
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= \
    "$PYTHON" -m pip download --isolated --only-binary=:all: --index-url https://pypi.org/simple \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --python-version "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    --progress-bar off "$@" >&2
}
if [[ $# -ge 1 ]]; then
  INC="$1"
  LIBINC="${2:-$CUDA_HOME/include}"
else
  TORCH_VERSION="${TORCH_VERSION:-$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')}"
  CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/pyrebasin/torch-cuda-headers/$TORCH_VERSION"
  INC="$CACHE/include"
  LIBINC="$CACHE/cuda-libs-include"
  if [[ ! -f "$INC/c10/cuda/CUDAGuard.h" || ! -f "$LIBINC/cusparse.h" ]]; then
    echo "== downloading the CUDA torch $TORCH_VERSION wheel and the cuBLAS/cuSPARSE/cuSOLVER wheels" \
         "it pins to $CACHE (only headers are kept; nothing is installed)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    pip_download --no-deps "torch==$TORCH_VERSION" -d "$tmp/torch"
    # cu13 wheels pin cuda-toolkit[...] (a metapackage, hence with deps), older ones nvidia-*-cuXX.
    mapfile -t reqs < <("$PYTHON" "$ROOT/scripts/_cuda_headers.py" requirements "$tmp"/torch/torch-*.whl)
    [[ ${#reqs[@]} -gt 0 ]] || { echo "error: torch==$TORCH_VERSION pins no CUDA libraries" >&2; exit 2; }
    pip_download "${reqs[@]}" -d "$tmp/libs"
    rm -rf "$CACHE/partial"
    "$PYTHON" "$ROOT/scripts/_cuda_headers.py" extract "$tmp" "$CACHE/partial"
    rm -rf "$INC" "$LIBINC"
    mv "$CACHE/partial/include" "$INC"
    mv "$CACHE/partial/cuda-libs-include" "$LIBINC"
    rm -rf "$CACHE/partial" "$tmp"
    trap - EXIT
  fi
fi
[[ -f "$INC/c10/cuda/CUDAGuard.h" ]] || { echo "error: $INC has no c10/cuda/CUDAGuard.h (not a CUDA torch)" >&2; exit 2; }
[[ -f "$LIBINC/cusparse.h" ]] || { echo "error: no cusparse.h in $LIBINC (give the cuBLAS/cuSPARSE/cuSOLVER include folder as 2nd argument)" >&2; exit 2; }
t_headers=$(date +%s)

# --- 2. compile every object of the CUDA extension --------------------------------------------------
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/pyrebasin-cudacheck.XXXXXX")"
[[ "${KEEP_BUILD:-0}" == 1 ]] && echo "== objects kept in $BUILD" || trap 'rm -rf "$BUILD"' EXIT
PYINC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
# As setup.py + torch.utils.cpp_extension.CUDAExtension (abi flag: torch >= 2.7 wheels use the new ABI).
CXXFLAGS=(-std=c++20 -O0 -fPIC -fopenmp -ffp-contract=off -Wall -Werror=return-type
          -DPYREBASIN_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
          -D_GLIBCXX_USE_CXX11_ABI=1
          -I"$ROOT/csrc/include" -isystem "$INC" -isystem "$INC/torch/csrc/api/include"
          -isystem "$CUDA_HOME/include" -isystem "$LIBINC" -isystem "$PYINC")
# nvcc: setup.py's flags + cpp_extension's COMMON_NVCC_FLAGS (no implicit half/bfloat16 conversions or
# operators: the CMake object check does not pass these, the real CUDAExtension build does).
NVCCFLAGS=(-std=c++17 -O3 -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
           -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
           -Werror=all-warnings -gencode=arch=compute_80,code=sm_80 -Xcompiler -fPIC
           -I"$ROOT/csrc/include")

compile() {  # one source -> $BUILD/<dir>_<name>.o; prints its errors under a header
  local src="$1" obj
  obj="$BUILD/$(basename "$(dirname "$src")")_$(basename "$src").o"
  if [[ "$src" == *.cu ]]; then
    "$NVCC" "${NVCCFLAGS[@]}" -c "$src" -o "$obj" > "$obj.log" 2>&1
  else
    "$CXX" "${CXXFLAGS[@]}" -c "$src" -o "$obj" > "$obj.log" 2>&1
  fi
  local rc=$?
  if [[ $rc -ne 0 ]]; then echo "FAIL $src"; cat "$obj.log"; return 1; fi
  echo "ok   $src"
  [[ -s "$obj.log" ]] && sed 's/^/     /' "$obj.log"  # warnings
  return 0
}
export -f compile
export BUILD NVCC CXX

if [[ "${CUDA_ONLY:-0}" == 1 ]]; then  # the CPU sources also build in the normal CPU build
  mapfile -t SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cu csrc/cuda/*.cpp 2>/dev/null)
else
  mapfile -t SOURCES < <(cd "$ROOT" && ls csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cpu/*.cpp csrc/*.cpp 2>/dev/null)
fi
echo "== compiling ${#SOURCES[@]} sources against $INC (JOBS=$JOBS)"
# xargs runs compile() in subshells: the flag arrays travel as NUL-separated files.
printf '%s\0' "${CXXFLAGS[@]}" > "$BUILD/cxxflags"
printf '%s\0' "${NVCCFLAGS[@]}" > "$BUILD/nvccflags"
status=0
(cd "$ROOT" && printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c '
  mapfile -d "" -t CXXFLAGS < "$BUILD/cxxflags"; mapfile -d "" -t NVCCFLAGS < "$BUILD/nvccflags"
  compile "$@"' _ {}) || status=1
t_compile=$(date +%s)

# --- 3. link check: undefined pyrebasin:: symbols must be defined by some object ---------------------
if [[ $status -eq 0 ]]; then
  echo "== link check (pyrebasin:: symbols)"
  defined="$BUILD/defined.txt"
  nm --defined-only "$BUILD"/*.o 2>/dev/null | awk 'NF>=3 {print $3}' | sort -u > "$defined"
  for obj in "$BUILD"/*.o; do
    while read -r sym; do
      demangled="$(c++filt "$sym")"
      [[ "$demangled" == pyrebasin::* ]] || continue
      if ! grep -qxF "$sym" "$defined"; then
        echo "FAIL $(basename "$obj"): undefined $demangled"
        cands="$(c++filt < "$defined" | grep -F "${demangled%%(*}(" || true)"
        [[ -n "$cands" ]] && echo "     defined elsewhere as: $cands"
        status=1
      fi
    done < <(nm --undefined-only "$obj" | awk '{print $2}')
  done
fi
t_end=$(date +%s)
echo "== timings: headers $((t_headers - t_start)) s, compile $((t_compile - t_headers)) s," \
     "link check $((t_end - t_compile)) s, total $((t_end - t_start)) s"
if [[ $status -ne 0 ]]; then echo "== CUDA binding check FAILED" >&2; exit 1; fi
echo "== CUDA binding check passed"
