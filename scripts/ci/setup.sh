#!/usr/bin/env bash
# Everything the test suite needs beyond the Rust toolchain, as root on Debian 12: Open MPI and
# a single-node Slurm (tests/launchers.rs), python3 with safetensors and numpy
# (tests/checkpoint.rs). Idempotent.
set -euo pipefail
here="$(dirname "$0")"
"$here/setup-launchers.sh"
"$here/setup-python.sh"
