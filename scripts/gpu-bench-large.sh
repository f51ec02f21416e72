#!/usr/bin/env bash
# The large end of issue 7's loss grid, for a GPU session with device time left after
# scripts/gpu-check.sh: B = 256k at d = 512 and 768, Tessera's fused loss (bf16 and tf32, both
# modes; fp32 deterministic) beside inf-cl 1.2.1 (fp32, bf16) and the naive PyTorch loss (which
# reports OOM at this size: its B × B logits alone are 256 GiB in fp32). Each step has a timeout,
# all of them share GPU_BENCH_BUDGET_S (default 420 s). Prints the rows last; logs and JSON go to
# a temporary folder, packed with $OUT set into $OUT/gpu-bench-large.tar.gz.
#
# Usage: scripts/gpu-bench-large.sh [path-to-tessera-binary] [batch]   (batch default 262144)
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tessera}"
batch="${2:-262144}"
[[ -x "$bin" ]] || { echo "gpu-bench-large: $bin is not an executable (build: cargo build --release -p tessera-launch)" >&2; exit 2; }
out="$(mktemp -d)"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_BENCH_BUDGET_S:-420}))
status=0
summary=()

# step NAME SECONDS CMD... (scripts/gpu-steps.sh)
source scripts/gpu-steps.sh

step tessera-lowp 150 "$bin" cuda bench-loss --batch "$batch" --dim 512,768 --mode both --precision bf16,tf32 --reps 2 --json "$out/tessera-lowp.jsonl"
step tessera-fp32 120 "$bin" cuda bench-loss --batch "$batch" --dim 512,768 --mode det --precision fp32 --reps 1 --json "$out/tessera-fp32.jsonl"
if python3 -c "import torch, triton" 2>/dev/null; then
    step infcl 150 python3 scripts/bench_infcl.py --batch "$batch" --dim 512,768 --dtype bf16,fp32 --reps 2 --json "$out/infcl.jsonl"
else
    summary+=("$(printf '%-14s %-12s %5ss' infcl NO-TRITON 0)")
fi
if python3 -c "import torch" 2>/dev/null; then
    step torch-naive 60 python3 scripts/bench_torch_clip.py --batch "$batch" --dim 512 --dtype bf16 --reps 1 --json "$out/torch-naive.jsonl"
fi

echo
echo "=== B = $batch, fwd+bwd ms (median), peak / workspace MiB"
grep -hE '^ +[0-9]+ +[0-9]+ ' "$out"/tessera-*.log "$out"/infcl.log "$out"/torch-naive.log 2>/dev/null
echo "=== gpu-bench-large summary (logs in $out)"
printf '%s\n' "${summary[@]}"
pack_logs gpu-bench-large "$out"
[[ $status -eq 0 ]] && echo "gpu-bench-large: PASS" || echo "gpu-bench-large: FAIL"
exit $status
