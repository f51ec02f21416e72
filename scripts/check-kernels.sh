#!/usr/bin/env bash
# Compiles every CUDA kernel (rank/src/device/cuda/kernels/*.cu) with NVRTC for sm_80 and sm_90
# and fails on any error or warning. Needs no GPU: NVRTC comes from the PyPI wheel
# nvidia-cuda-nvrtc==13.0.88, installed (once) under target/cuda-wheels/ if missing.
#
# Usage: scripts/check-kernels.sh [path-to-tessera-binary]
#        scripts/check-kernels.sh --install-only   (install the wheel, print its lib folder)
#   default binary: target/release/tessera (brought up to date with
#   `cargo build --release -p tessera-launch`). Also runs the Rust test that compiles the kernels (it fails, not skips, under
#   CI=true when NVRTC cannot be loaded) unless CHECK_KERNELS_SKIP_TEST=1.
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_VERSION="13.0.88"
WHEEL_DIR="target/cuda-wheels/nvrtc-$NVRTC_VERSION"
LIB_DIR="$WHEEL_DIR/nvidia/cu13/lib"

say() { echo "check-kernels: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ ! -e "$LIB_DIR/libnvrtc.so.13" ]]; then
    command -v python3 >/dev/null || die "python3 is needed to install nvidia-cuda-nvrtc (run scripts/ci/setup-python.sh)"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (run scripts/ci/setup-python.sh)"
    say "installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $WHEEL_DIR"
    rm -rf "$WHEEL_DIR"
    pip_args=(install --quiet --disable-pip-version-check --no-deps --no-compile
        --target "$WHEEL_DIR" "nvidia-cuda-nvrtc==$NVRTC_VERSION")
    # Older Debian pips apply PEP 668 even to --target installs: allow it there (the wheel
    # goes into target/, never into the system python).
    python3 -m pip "${pip_args[@]}" 2>/dev/null \
        || python3 -m pip "${pip_args[@]}" --break-system-packages \
        || die "pip could not install nvidia-cuda-nvrtc==$NVRTC_VERSION"
fi
[[ -e "$LIB_DIR/libnvrtc.so.13" ]] || die "the wheel has no $LIB_DIR/libnvrtc.so.13 (layout changed?)"
if [[ "${1:-}" == "--install-only" ]]; then
    echo "$PWD/$LIB_DIR"
    exit 0
fi

# glibc reads LD_LIBRARY_PATH only at process start: set it before running anything.
export LD_LIBRARY_PATH="$PWD/$LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ $# -gt 0 ]]; then
    bin="$1"
    [[ -x "$bin" ]] || die "$bin is not an executable"
else
    bin="target/release/tessera"
    cargo build --release -p tessera-launch  # a no-op when up to date
fi
"$bin" cuda check-kernels --arch sm_80,sm_90

if [[ "${CHECK_KERNELS_SKIP_TEST:-0}" != "1" ]]; then
    # The same compilation through the Rust test (fails under CI=true without NVRTC).
    cargo test --release -p tessera-rank --lib device::cuda::nvrtc
fi
say "ok"
