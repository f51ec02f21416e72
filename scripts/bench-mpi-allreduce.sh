#!/usr/bin/env bash
# Peer benchmark for `tessera bench allreduce`: Open MPI's MPI_Allreduce of 64 MiB of floats
# at 2 and 4 processes, over shared memory (default BTLs) and forced onto TCP loopback.
# Usage: scripts/bench-mpi-allreduce.sh [SIZE_BYTES] [ITERS]
set -euo pipefail
size="${1:-67108864}"
iters="${2:-10}"
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
    echo "installing openmpi-bin libopenmpi-dev (Debian packages)" >&2
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mpicc -O2 -o "$work/mpi_allreduce_bench" "$here/mpi_allreduce_bench.c"
common=(--allow-run-as-root --oversubscribe)
for np in 2 4; do
    echo -n "shared-memory (default btl): "
    mpirun "${common[@]}" -np "$np" "$work/mpi_allreduce_bench" "$size" "$iters"
    echo -n "tcp loopback (--mca btl tcp,self): "
    mpirun "${common[@]}" --mca btl tcp,self -np "$np" "$work/mpi_allreduce_bench" "$size" "$iters"
done
