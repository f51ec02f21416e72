#!/usr/bin/env bash
# The CPU benchmarks recorded in docs/BENCHMARKS.md, each beside its peer in the same run:
#   1. 64 MiB all-reduce at 2 and 4 ranks: tessera's TCP ring vs Open MPI (shared memory, TCP);
#   2. sgemm at 1024², 2048², 4096²: the CPU device vs numpy (OpenBLAS);
#   3. training throughput of the default job at 1, 2 and 4 ranks;
#   4. the contrastive losses (CLIP, SigLIP), tiled ring vs naive, 2 ranks, beside an sgemm.
# Usage: scripts/bench-cpu.sh [ITERS]   (builds the release binary first)
set -euo pipefail
iters="${1:-10}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release -q -p tessera-launch
tessera="$root/target/release/tessera"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"

echo "## all-reduce, 64 MiB f32"
for np in 2 4; do
    "$tessera" bench allreduce --nproc "$np" --sizes 64M --iters "$iters" --warmup 2 --check
done
"$root/scripts/bench-mpi-allreduce.sh" 67108864 "$iters"

echo "## sgemm"
if ! python3 -c 'import numpy' 2>/dev/null; then
    python3 -m pip install -q numpy
fi
"$tessera" bench gemm --sizes 1024,2048,4096 --reps 3

echo "## training throughput, default job (200 steps, no evaluation)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for np in 1 2 4; do
    "$tessera" run --nproc "$np" --set run.steps=200 --set run.eval_every=0 \
        --set "run.out_dir=\"$out/np$np\"" 2>/dev/null | tail -n 1 |
        python3 -c 'import json, sys
s = json.loads(sys.stdin.read())
print("ranks %d: %.0f samples/s total, %.0f per rank, final loss %.3f"
      % (s["world"], s["samples_per_s"], s["samples_per_s_per_rank"], s["loss"]))'
done

echo "## contrastive loss forward+backward, tiled ring vs naive, B = 16384, d = 256, 2 ranks"
"$tessera" bench gemm --sizes 2048 --reps 3 --no-peer
"$tessera" bench loss --nproc 2 --batch 16384 --dim 256 --loss clip,siglip 2>/dev/null
