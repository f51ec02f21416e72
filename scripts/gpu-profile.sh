#!/usr/bin/env bash
# Nsight Compute profile of the fused CLIP loss kernels (issue 7): for each precision and mode
# given, one `tessera cuda bench-loss` run under `ncu --set full`, profiling the first forward
# and the first backward launch (the warm-up pass). Clocks are left as the card has them
# (`--clock-control none`). Prints the headline metrics of each kernel last; with $OUT set, the
# full text reports and the .ncu-rep files go there packed in one archive (profile.tar.gz),
# since the device tool brings back only a few files.
#
# Usage: scripts/gpu-profile.sh BIN [B] [d] [precisions] [modes]
#        defaults: target/release/tessera 16384 512 bf16,tf32 det,fast
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tessera}"
batch="${2:-16384}"
dim="${3:-512}"
precs="${4:-bf16,tf32}"
modes="${5:-det,fast}"
[[ -x "$bin" ]] || { echo "gpu-profile: $bin is not an executable (build: cargo build --release -p tessera-launch)" >&2; exit 2; }
command -v ncu >/dev/null || { echo "gpu-profile: ncu (Nsight Compute) is not on the PATH" >&2; exit 2; }
out="${OUT:-$(mktemp -d)}"
work="$(mktemp -d)"
status=0
for p in ${precs//,/ }; do
    for m in ${modes//,/ }; do
        name="ncu-$p-$m-$batch-$dim"
        echo "=== $name"
        if ! timeout 120 ncu --clock-control none --set full -k 'regex:^clip_(fwd|bwd)' -c 2 \
            --export "$work/$name" -f \
            "$bin" cuda bench-loss --batch "$batch" --dim "$dim" --mode "$m" --precision "$p" \
            --reps 1 >"$work/$name.txt" 2>&1; then
            echo "gpu-profile: ncu failed for $p $m (see $name.txt)"
            tail -5 "$work/$name.txt"
            status=1
        fi
        # The report's sections as text (with --export, ncu prints none of them itself).
        ncu -i "$work/$name.ncu-rep" --page details >"$work/$name.details.txt" 2>&1 || status=1
    done
done
tar -C "$work" -czf "$out/profile.tar.gz" . && echo "gpu-profile: reports in $out/profile.tar.gz"
echo "=== headline metrics"
for f in "$work"/ncu-*.details.txt; do
    echo "--- $(basename "$f" .details.txt)"
    grep -E '^  [a-z_0-9]+\(|^  [a-z_0-9]+ \(|Duration |Compute \(SM\) Throughput|Memory Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc Active' "$f" | sed 's/  */ /g'
done
exit $status
