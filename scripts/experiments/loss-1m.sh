#!/usr/bin/env bash
# Issue 4's memory target: one forward+backward of the tiled CLIP loss at B = 1,048,576,
# d = 128, on 4 rank processes, with the whole job's peak RSS under 2 GB. About 1.1e15 flops:
# ~2.5 hours on an idle 2-core machine, so start it first and leave the machine alone.
#
# Writes OUT/bench.json (the bench's own JSON line: time, GFLOP/s, peak_rss_total_bytes),
# OUT/bench.err (progress lines from rank 0, at most one per 30 s) and OUT/rss.log (every
# minute: each rank's VmHWM in KiB and their sum), and prints the result last.
#
# Usage: scripts/experiments/loss-1m.sh [BIN] [OUT]   (defaults: target/release/tessera, runs/loss-1m)
# (BATCH=8192 EVERY_S=1 for a quick trial of the script itself.)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-target/release/tessera}" out="${2:-runs/loss-1m}"
[[ -x "$bin" ]] || { echo "loss-1m: $bin is not executable (cargo build --release -p tessera-launch)" >&2; exit 2; }
mkdir -p "$out"
"$bin" bench loss --nproc 4 --batch "${BATCH:-1048576}" --dim 128 --skip-naive --json \
    > "$out/bench.json" 2> "$out/bench.err" &
job=$!
: > "$out/rss.log"
while kill -0 "$job" 2>/dev/null; do
    sum=0 each=""
    for p in $(pgrep -P "$job" -f 'rank --job bench-loss' || true); do
        h=$(awk '/VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        sum=$((sum + ${h:-0})) each="$each ${h:-0}"
    done
    echo "$(date -u +%FT%TZ) ranks_hwm_kib:$each sum_kib: $sum" >> "$out/rss.log"
    sleep "${EVERY_S:-60}"
done
wait "$job" || { echo "loss-1m: the bench failed; see $out/bench.err" >&2; exit 1; }
echo "loss-1m: sampled peak (sum of the ranks' VmHWM): $(awk '{print $NF}' "$out/rss.log" | sort -n | tail -1) KiB"
echo "loss-1m: the bench's result:"
cat "$out/bench.json"
