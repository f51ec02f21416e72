#!/usr/bin/env bash
# Installs what tests/checkpoint.rs needs to check `tessera export --safetensors` against the
# reference reader: python3 with the safetensors and numpy packages (pinned). Idempotent: if
# the pinned versions are already importable, nothing is installed.
#
# Usage: scripts/ci/setup-python.sh   (as root on Debian/Ubuntu when python3 itself is missing)
set -euo pipefail

SAFETENSORS_VERSION="0.6.2"
NUMPY_VERSION="2.2.6"

say() { echo "setup-python: $*" >&2; }
die() { say "error: $*"; exit 1; }

if ! command -v python3 >/dev/null; then
    command -v apt-get >/dev/null || die "python3 is missing and there is no apt-get to install it"
    say "installing python3 and pip"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
fi

have() {
    python3 - "$SAFETENSORS_VERSION" "$NUMPY_VERSION" <<'PY' 2>/dev/null
import sys
import numpy, safetensors
sys.exit(0 if (safetensors.__version__, numpy.__version__) == (sys.argv[1], sys.argv[2]) else 1)
PY
}

# NVRTC from the PyPI wheel nvidia-cuda-nvrtc (pinned in scripts/check-kernels.sh), for the CUDA
# kernel compile check that runs without a GPU; installed under target/cuda-wheels/.
install_nvrtc() {
    "$(dirname "$0")/../check-kernels.sh" --install-only >/dev/null
}

if have; then
    say "safetensors $SAFETENSORS_VERSION and numpy $NUMPY_VERSION already installed"
    install_nvrtc
    exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    command -v apt-get >/dev/null || die "python3 has no pip and there is no apt-get to install it"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
fi

pkgs=("safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION")
say "pip install ${pkgs[*]}"
# Debian's system python refuses pip installs (PEP 668) unless told otherwise; CI is a
# throw-away machine, so allow it there.
if ! python3 -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${pkgs[@]}"
fi
have || die "safetensors $SAFETENSORS_VERSION / numpy $NUMPY_VERSION still not importable by python3"
install_nvrtc
say "ok"
