#!/usr/bin/env bash
# A/B timing of the fused CLIP loss on one GPU: two tessera binaries (say, the last build whose
# numbers are recorded in docs/BENCHMARKS.md, and the current one) run `tessera cuda
# bench-loss` on the same sizes, alternating, ROUNDS times, in one call of the device tool, so
# that both see the same card, clocks and neighbours. Prints, per size, mode and precision, the
# median over the rounds of each binary's median time and the ratio B / A (below 1: B faster),
# and checks that both give the same loss to 5 significant digits (a kernel change that alters
# the result shows up here). With $OUT set, the JSON rows are packed into $OUT/gpu-ab.tar.gz.
#
# Usage: scripts/gpu-ab.sh A_BIN B_BIN [ROUNDS]     (ROUNDS default 2; about 60 s per round)
# A baseline binary of an earlier commit:  git worktree add /tmp/base COMMIT &&
#   (cd /tmp/base && cargo build --release -p tessera-launch) &&
#   strip -o target/gpu/tessera-COMMIT /tmp/base/target/release/tessera
set -uo pipefail
cd "$(dirname "$0")/.."
a="${1:?usage: scripts/gpu-ab.sh A_BIN B_BIN [ROUNDS]}"
b="${2:?usage: scripts/gpu-ab.sh A_BIN B_BIN [ROUNDS]}"
rounds="${3:-2}"
for x in "$a" "$b"; do
    [[ -x "$x" ]] || { echo "gpu-ab: $x is not an executable" >&2; exit 2; }
done
work="$(mktemp -d)"
status=0
source scripts/gpu-steps.sh  # pack_logs
# name|bench-loss arguments: every precision at B = 16k, and the target size in bf16 and tf32.
grid=(
    "16k|--batch 16384 --dim 512,768 --mode both --precision fp32,tf32x3,tf32,bf16 --reps 3"
    "64k|--batch 65536 --dim 768 --mode both --precision bf16,tf32 --reps 2"
)
for ((r = 1; r <= rounds; r++)); do
    for side in A B; do
        bin="$a"
        [[ $side == B ]] && bin="$b"
        for entry in "${grid[@]}"; do
            name="${entry%%|*}"
            read -r -a args <<<"${entry#*|}"
            log="$work/$side-$name-r$r"
            if ! timeout 120 "$bin" cuda bench-loss "${args[@]}" --json "$log.jsonl" >"$log.log" 2>&1; then
                echo "gpu-ab: $side ($bin) failed on $name, round $r:"
                tail -5 "$log.log"
                status=1
            fi
        done
    done
done
python3 - "$work" "$a ($("$a" --version 2>&1))" "$b ($("$b" --version 2>&1))" <<'EOF' || status=1
import glob, json, statistics, sys
work, a, b = sys.argv[1:4]
rows = {}
for side in "AB":
    for f in glob.glob(f"{work}/{side}-*.jsonl"):
        for line in open(f):
            r = json.loads(line)
            key = (r["b"], r["d"], r["mode"], r["precision"])
            rows.setdefault((side, key), []).append(r)
keys = sorted({k for (_, k) in rows}, key=lambda k: (k[0], k[1], k[3], k[2]))
print(f"A = {a}\nB = {b}\nmedian over rounds of each run's median fwd+bwd ms")
print(f"{'B':>7} {'d':>5} {'mode':<14} {'prec':<7} {'A ms':>10} {'B ms':>10} {'B/A':>6}  loss")
bad = 0
for k in keys:
    ra, rb = rows.get(("A", k), []), rows.get(("B", k), [])
    if not ra or not rb:
        print(f"{k[0]:>7} {k[1]:>5} {k[2]:<14} {k[3]:<7} missing on one side")
        bad += 1
        continue
    ta = statistics.median(r["ms_median"] for r in ra)
    tb = statistics.median(r["ms_median"] for r in rb)
    la, lb = ra[0]["loss"], rb[0]["loss"]
    same = abs(la - lb) <= 1e-5 * abs(la)
    bad += not same
    print(f"{k[0]:>7} {k[1]:>5} {k[2]:<14} {k[3]:<7} {ta:>10.3f} {tb:>10.3f} {tb / ta:>6.3f}  "
          f"{'same' if same else f'DIFFERS {la} vs {lb}'}")
sys.exit(1 if bad else 0)
EOF
pack_logs gpu-ab "$work"
[[ $status -eq 0 ]] && echo "gpu-ab: PASS" || echo "gpu-ab: FAIL"
exit $status
