#!/usr/bin/env bash
# A/B timing of the fused CLIP loss on one GPU: two or more tessera binaries (say, the last build
# whose numbers are recorded in docs/BENCHMARKS.md, then later builds) run `tessera cuda
# bench-loss` on the same sizes, taking turns, ROUNDS times, in one call of the device tool, so
# that all see the same card, clocks and neighbours. Prints, per size, mode and precision, the
# median over the rounds of each binary's median time and its ratio to the first binary's
# (below 1: faster), and checks that all give the first one's loss to 5 significant digits (a
# kernel change that alters the result shows up here). With $OUT set, the JSON rows are packed
# into $OUT/gpu-ab.tar.gz.
#
# Usage: scripts/gpu-ab.sh BIN0 BIN1 [BIN2 ...] [ROUNDS]   (ROUNDS: a number, default 2; about
#        30 s per binary and round)
# A BIN may carry extra bench-loss arguments in the same word, e.g. the same binary with a kernel
# knob: "target/gpu/tessera --define CLIP_FWD_MIN_BLOCKS=3" (docs/GPU.md, "Kernel knobs").
# Binaries that report them (since the knobs came) also get forward and backward ratios, and
# their gradients are checked against the first such binary's (norms and projections of dI and
# dT within 2e-2 of the norm: tells a wrong gradient from rounding; the loss alone would not see
# a wrong backward).
# A binary of an earlier commit:  git worktree add /tmp/base COMMIT &&
#   (cd /tmp/base && cargo build --release -p tessera-launch) &&
#   strip -o target/gpu/tessera-COMMIT /tmp/base/target/release/tessera
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/gpu-ab.sh BIN0 BIN1 [BIN2 ...] [ROUNDS]"
bins=("$@")
rounds=2
if ((${#bins[@]} > 0)) && [[ "${bins[-1]}" =~ ^[0-9]+$ ]]; then
    rounds="${bins[-1]}"
    unset 'bins[-1]'
fi
((${#bins[@]} >= 2)) || { echo "$usage" >&2; exit 2; }
((rounds >= 1)) || { echo "gpu-ab: ROUNDS must be at least 1" >&2; exit 2; }
for x in "${bins[@]}"; do
    read -r -a cmd <<<"$x"
    [[ -x "${cmd[0]}" ]] || { echo "gpu-ab: ${cmd[0]} is not an executable" >&2; exit 2; }
done
work="$(mktemp -d)"
status=0
source scripts/gpu-steps.sh  # pack_logs
# name|bench-loss arguments: every precision at B = 4k (a grid of fewer row tiles than a wave:
# the backward's column splits) and 16k, and the target size in bf16 and tf32.
grid=(
    "16k|--batch 4096,16384 --dim 512,768 --mode both --precision fp32,tf32x3,tf32,bf16 --reps 3"
    "64k|--batch 65536 --dim 768 --mode both --precision bf16,tf32 --reps 2"
)
for ((r = 1; r <= rounds; r++)); do
    for i in "${!bins[@]}"; do
        read -r -a cmd <<<"${bins[$i]}"
        for entry in "${grid[@]}"; do
            name="${entry%%|*}"
            read -r -a args <<<"${entry#*|}"
            log="$work/$i-$name-r$r"
            if ! timeout 120 "${cmd[0]}" cuda bench-loss "${args[@]}" "${cmd[@]:1}" \
                --json "$log.jsonl" >"$log.log" 2>&1; then
                echo "gpu-ab: $i (${bins[$i]}) failed on $name, round $r:"
                tail -5 "$log.log"
                status=1
            fi
        done
    done
done
labels=()
for i in "${!bins[@]}"; do
    read -r -a cmd <<<"${bins[$i]}"
    labels+=("${bins[$i]} ($("${cmd[0]}" --version 2>&1))")
done
python3 - "$work" "${labels[@]}" <<'EOF' || status=1
import glob, json, statistics, sys
work, labels = sys.argv[1], sys.argv[2:]
n = len(labels)
rows = {}
for i in range(n):
    for f in glob.glob(f"{work}/{i}-*.jsonl"):
        for line in open(f):
            r = json.loads(line)
            key = (r["b"], r["d"], r["mode"], r["precision"])
            rows.setdefault((i, key), []).append(r)
keys = sorted({k for (_, k) in rows}, key=lambda k: (k[0], k[1], k[3], k[2]))
for i, l in enumerate(labels):
    print(f"{i} = {l}")
print("median over rounds of each run's median fwd+bwd ms; i/0: ratio to binary 0")
head = f"{'B':>7} {'d':>5} {'mode':<14} {'prec':<7} {'0 ms':>9}"
for i in range(1, n):
    head += f" {f'{i} ms':>9} {f'{i}/0':>6}"
print(head + "  loss")
bad = 0
for k in keys:
    line = f"{k[0]:>7} {k[1]:>5} {k[2]:<14} {k[3]:<7}"
    got = [rows.get((i, k), []) for i in range(n)]
    if any(not g for g in got):
        print(line + " missing for binary " + ",".join(str(i) for i, g in enumerate(got) if not g))
        bad += 1
        continue
    t = [statistics.median(r["ms_median"] for r in g) for g in got]
    loss = [g[0]["loss"] for g in got]
    line += f" {t[0]:>9.3f}"
    for i in range(1, n):
        line += f" {t[i]:>9.3f} {t[i] / t[0]:>6.3f}"
    differs = [i for i in range(1, n) if abs(loss[i] - loss[0]) > 1e-5 * abs(loss[0])]
    bad += bool(differs)
    line += ("  same" if not differs else
             "  DIFFERS " + ", ".join(f"{i}: {loss[i]} vs {loss[0]}" for i in differs))
    fp = ["grad_norm_i", "grad_norm_t", "grad_proj_i", "grad_proj_t"]
    with_fp = [i for i in range(n) if all(f in got[i][0] for f in fp)]
    if len(with_fp) >= 2:
        g0 = got[with_fp[0]][0]
        def grads_differ(r):
            return any(abs(r[f] - g0[f]) > 2e-2 * g0["grad_norm_" + f[-1]] for f in fp)
        gd = [i for i in with_fp[1:] if grads_differ(got[i][0])]
        bad += bool(gd)
        line += (f"  grads same as {with_fp[0]}" if not gd else
                 f"  GRADS DIFFER from {with_fp[0]}: " + ", ".join(map(str, gd)))
    print(line)
# Forward and backward apart, for the binaries that time them (fwd_ms_median, bwd_ms_median).
split = [i for i in range(n) if all("fwd_ms_median" in r
                                    for (j, _), rs in rows.items() if j == i for r in rs)]
if len(split) >= 2:
    b0 = split[0]
    print(f"forward / backward apart (median over rounds of each run's median ms); "
          f"ratios to binary {b0}")
    head = f"{'B':>7} {'d':>5} {'mode':<14} {'prec':<7} {f'{b0} fwd':>9} {f'{b0} bwd':>9}"
    for i in split[1:]:
        head += f" {f'{i}/{b0} fwd':>9} {f'{i}/{b0} bwd':>9}"
    print(head)
    for k in keys:
        got = [rows.get((i, k), []) for i in split]
        if any(not g for g in got):
            continue
        f = [statistics.median(r["fwd_ms_median"] for r in g) for g in got]
        b = [statistics.median(r["bwd_ms_median"] for r in g) for g in got]
        line = f"{k[0]:>7} {k[1]:>5} {k[2]:<14} {k[3]:<7} {f[0]:>9.3f} {b[0]:>9.3f}"
        for j in range(1, len(split)):
            line += f" {f[j] / f[0]:>9.3f} {b[j] / b[0]:>9.3f}"
        print(line)
sys.exit(1 if bad else 0)
EOF
pack_logs gpu-ab "$work"
[[ $status -eq 0 ]] && echo "gpu-ab: PASS" || echo "gpu-ab: FAIL"
exit $status
