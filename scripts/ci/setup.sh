#!/usr/bin/env bash
# Everything the test suite needs beyond the Rust toolchain, as root on Debian 12: Open MPI and
# a single-node Slurm (tests/launchers.rs), python3 with safetensors and numpy
# (tests/checkpoint.rs), and g++ with C++20 for the CPU emulation of the CUDA kernels
# (rank/src/device/cuda/emu.rs; Debian's g++ also brings ThreadSanitizer's runtime, libtsan2,
# which the emulation's race check preloads: emu_race_tests.rs). Idempotent.
set -euo pipefail
here="$(dirname "$0")"
"$here/setup-launchers.sh"
"$here/setup-python.sh"
if ! command -v g++ >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi
