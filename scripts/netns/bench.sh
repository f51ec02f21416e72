#!/usr/bin/env bash
# All-reduce bus bandwidth and training throughput of Tessera across network namespaces joined
# by shaped veth links (scripts/netns/cluster.sh), against the ring model
#
#     t = 2(n-1)/n · S/BW + 2(n-1)·α          busbw = 2(n-1)/n · S / t
#
# with BW the link's TCP goodput (rate · 1448/1514: MSS over frame bytes at MTU 1500 with TCP
# timestamps) and α the per-step latency: the link's one-way delay plus the software latency
# fitted from a 4 KiB all-reduce on unshaped links (α0 = t(4 KiB) / 2(n-1)).
#
# Training: the default job (`tessera rank` with the embedded config), run.steps steps, no
# evaluation. Its wire bytes per step and rank are read from the nodes' eth0 tx counters; the
# model is one step = (compute + in-memory traffic time, from the unshaped run) + wire bytes /
# rate, so samples/s = global_batch / that. Latency is left out of that model; with a delay D
# the table shows instead how many one-way delays a step costs: (step − step at the same rate
# without delay) / D, when that link was measured too.
#
#   bench.sh [--tessera PATH] [--nodes "2 4"] [--links "none 100mbit 1gbit 100mbit/2ms"]
#            [--sizes 1M,16M,64M] [--iters 3] [--warmup 1] [--train-steps 100] [--out DIR]
#
# A link is RATE[/DELAY] (a tc rate, "none" for unshaped; DELAY a one-way latency such as 2ms,
# given to cluster.sh --delay). "none" means unshaped links (CPU-bound), where α0 and the compute
# time come from, so keep it first. Prints two markdown tables; raw output stays in --out.
# Needs root and iproute2; a cluster of prefix $TSR_PREFIX (default tsr) must not be up.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLUSTER="$SCRIPT_DIR/cluster.sh"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

TESSERA="${TESSERA:-$REPO_ROOT/target/release/tessera}"
NODES="2 4"
LINKS="none 100mbit 1gbit"
SIZES="1M,16M,64M"
ITERS=3
WARMUP=1
TRAIN_STEPS=100
OUT=""
REPORT_ONLY=""

die() {
    echo "bench.sh: error: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
    --tessera) TESSERA="${2:?}"; shift 2 ;;
    --nodes) NODES="${2:?}"; shift 2 ;;
    --links) LINKS="${2:?}"; shift 2 ;;
    --sizes) SIZES="${2:?}"; shift 2 ;;
    --iters) ITERS="${2:?}"; shift 2 ;;
    --warmup) WARMUP="${2:?}"; shift 2 ;;
    --train-steps) TRAIN_STEPS="${2:?}"; shift 2 ;;
    --out) OUT="${2:?}"; shift 2 ;;
    --report) REPORT_ONLY="${2:?}"; shift 2 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see bench.sh --help)" ;;
    esac
done

PREFIX="${TSR_PREFIX:-tsr}"
# Seconds of a tc time (2ms, 500us, 1s); empty is 0.
seconds_of() {
    [[ -z $1 ]] && { echo 0; return; }
    [[ $1 =~ ^([0-9]+(\.[0-9]+)?)(s|ms|us)$ ]] || die "delay '$1' not understood: use e.g. 2ms"
    awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" \
        'BEGIN { printf "%.9f\n", n / ((u == "s") ? 1 : (u == "ms") ? 1e3 : 1e6) }'
}

# Bits per second of a tc rate (100mbit, 1gbit); "none" is 0.
bits_of() {
    [[ $1 == none ]] && { echo 0; return; }
    [[ ${1,,} =~ ^([0-9]+(\.[0-9]+)?)([kmg]?)bit$ ]] || die "rate '$1' not understood: use \
e.g. 100mbit, 1gbit, or none"
    awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" \
        'BEGIN { printf "%.0f\n", n * ((u == "k") ? 1e3 : (u == "m") ? 1e6 : (u == "g") ? 1e9 : 1) }'
}

json_field() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" <<<"$1"; }

tx_total() { # sum of the node namespaces' eth0 tx bytes
    local n="$1" i s=0 b
    for ((i = 0; i < n; i++)); do
        b="$(ip netns exec "$PREFIX-n$i" cat /sys/class/net/eth0/statistics/tx_bytes)"
        s=$((s + b))
    done
    echo "$s"
}

# The tables, from the rows an earlier run left in $OUT (also: bench.sh --report DIR).
# shellcheck disable=SC2094 # the training rows are read twice, never written here
report() {
AR_ROWS="$OUT/allreduce.tsv"
TR_ROWS="$OUT/train.tsv"
TRAIN_STEPS="$(sed -n 's/.*train_steps=\([0-9]*\).*/\1/p' "$OUT/params")"
echo
echo "Parameters: $(cat "$OUT/params")"
echo
echo "All-reduce (f32 sum, TCP ring, every result checked); busbw = 2(n-1)/n · size / time;" \
    "α0 fitted per world size from 4 KiB on unshaped links:"
awk -F'\t' '{ printf "  n=%s: alpha0 = %.1f us\n", $1, $2 * 1e6 }' "$OUT/fitted.tsv"
echo
echo "| ranks | rate | delay | size | time (ms) | busbw (MB/s) | model time (ms) | model busbw (MB/s) | measured / model |"
echo "|---|---|---|---|---|---|---|---|---|"
while IFS=$'\t' read -r n rate delay size t_us busbw; do
    bits="$(bits_of "$rate")"
    d=0
    [[ $delay == 0 ]] || d="$(seconds_of "$delay")"
    alpha="$(awk -F'\t' -v n="$n" '$1 == n { print $2 }' "$OUT/fitted.tsv")"
    awk -v n="$n" -v rate="$rate" -v delay="$delay" -v S="$size" -v t="$t_us" -v bb="$busbw" \
        -v bits="$bits" -v a0="${alpha:-0}" -v d="$d" 'BEGIN {
        size = (S >= 1048576) ? sprintf("%g MiB", S / 1048576) : sprintf("%g KiB", S / 1024);
        if (bits > 0 || d > 0) {
            tm = 2 * (n - 1) * (a0 + d);
            if (bits > 0) tm += 2 * (n - 1) / n * S / (bits / 8 * 1448 / 1514);
            bm = 2 * (n - 1) / n * S / tm;
            printf "| %d | %s | %s | %s | %.2f | %.1f | %.2f | %.1f | %.2f |\n", n, rate, delay,
                size, t / 1e3, bb * 1e3, tm * 1e3, bm / 1e6, (bb * 1e9) / bm;
        } else {
            printf "| %d | %s | %s | %s | %.2f | %.1f | - | - | - |\n", n, rate, delay, size,
                t / 1e3, bb * 1e3;
        }
    }'
done <"$AR_ROWS"

echo
echo "Training (default job, $TRAIN_STEPS steps, no evaluation). Wire: bytes each rank sent per" \
    "step (eth0 counters); link bound: global batch / (wire bytes / rate); model: step =" \
    "unshaped step + wire bytes / rate; last column: (step − step at the same rate without" \
    "delay) / one-way delay:"
echo
echo "| ranks | rate | delay | samples/s | step (ms) | wire KB per step and rank | link bound samples/s | measured / bound | model samples/s | measured / model | delays per step |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
while IFS=$'\t' read -r n rate delay sps gb wire; do
    bits="$(bits_of "$rate")"
    d=0
    [[ $delay == 0 ]] || d="$(seconds_of "$delay")"
    step0="$(awk -F'\t' -v n="$n" '$1 == n { print $3 }' "$OUT/fitted.tsv")"
    # The same link without the delay, if it was measured: the delay's cost is the difference.
    nodelay="$(awk -F'\t' -v n="$n" -v r="$rate" '$1 == n && $2 == r && $3 == "0" \
        { printf "%.9f\n", $5 / $4 }' "$TR_ROWS")"
    awk -v n="$n" -v rate="$rate" -v delay="$delay" -v sps="$sps" -v gb="$gb" -v w="$wire" \
        -v bits="$bits" -v d="$d" -v s0="${step0:-0}" -v snd="${nodelay:-0}" 'BEGIN {
        step = gb / sps;
        bound = "-"; rb = "-"; model = "-"; rm = "-"; k = "-";
        if (bits > 0) {
            tw = w * 8 / bits;
            bound = sprintf("%.0f", gb / tw);
            rb = sprintf("%.2f", tw / step);
            if (s0 > 0) {
                model = sprintf("%.0f", gb / (s0 + tw));
                rm = sprintf("%.2f", (s0 + tw) / step);
            }
        }
        if (d > 0 && snd > 0) k = sprintf("%.1f", (step - snd) / d);
        printf "| %d | %s | %s | %.0f | %.2f | %.1f | %s | %s | %s | %s | %s |\n", n, rate,
            delay, sps, step * 1e3, w / 1e3, bound, rb, model, rm, k;
    }'
done <"$TR_ROWS"
echo
echo "(raw output in $OUT)"
}

main() {
if [[ -n $REPORT_ONLY ]]; then
    [[ -f $REPORT_ONLY/params ]] || die "$REPORT_ONLY holds no bench.sh output (no params file)"
    OUT="$REPORT_ONLY"
    report
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (it builds network namespaces with cluster.sh)"
[[ -x $TESSERA ]] || die "tessera binary '$TESSERA' not found: build it (cargo build --release \
-p tessera-launch --bin tessera) or pass --tessera PATH / set TESSERA"
TESSERA="$(cd "$(dirname "$TESSERA")" && pwd)/$(basename "$TESSERA")"
export TESSERA
[[ -n $OUT ]] || OUT="$(mktemp -d "${TMPDIR:-/tmp}/tessera-netns-bench.XXXXXX")"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
printf 'nodes=%s links=%s sizes=4K,%s iters=%s warmup=%s train_steps=%s tessera=%s\n' \
    "$NODES" "$LINKS" "$SIZES" "$ITERS" "$WARMUP" "$TRAIN_STEPS" \
    "$("$TESSERA" --version | tr -d '\n')" >"$OUT/params"

for link in $LINKS; do
    bits_of "${link%%/*}" >/dev/null
    [[ $link == */* ]] && seconds_of "${link#*/}" >/dev/null
done

UP=0
trap '((UP)) && "$CLUSTER" down >/dev/null 2>&1' EXIT

AR_ROWS="$OUT/allreduce.tsv"
TR_ROWS="$OUT/train.tsv"
: >"$AR_ROWS"
: >"$TR_ROWS"
: >"$OUT/fitted.tsv"
declare -A ALPHA0 STEP0

for n in $NODES; do
    "$CLUSTER" up "$n" >&2
    UP=1
    for link in $LINKS; do
        rate="${link%%/*}"
        delay=""
        [[ $link == */* ]] && delay="${link#*/}"
        [[ $delay == 0 || $delay == 0ms ]] && delay=""
        shape=()
        [[ $rate == none ]] || shape+=(--rate "$rate")
        [[ -z $delay ]] || shape+=(--delay "$delay")
        "$CLUSTER" shape "${shape[@]}" >&2
        tag="n$n-$rate-${delay:-0}"
        args="{\"sizes\":\"4K,$SIZES\",\"iters\":$ITERS,\"warmup\":$WARMUP,\"check\":true,\"json\":true}"
        echo "# all-reduce: $n ranks, rate $rate, delay ${delay:-0}" >&2
        "$CLUSTER" run --logdir "$OUT/$tag-allreduce" -- --job bench-allreduce \
            --job-args "$args" >"$OUT/$tag-allreduce.jsonl"
        while read -r line; do
            [[ -n $line ]] || continue
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$rate" "${delay:-0}" \
                "$(json_field "$line" size_bytes)" \
                "$(json_field "$line" time_us)" "$(json_field "$line" busbw)" >>"$AR_ROWS"
        done <"$OUT/$tag-allreduce.jsonl"
        if [[ $rate == none && -z $delay ]]; then
            t4k="$(awk -F'\t' -v n="$n" '$1 == n && $2 == "none" && $3 == 0 && $4 == 4096 \
                { print $5 }' "$AR_ROWS")"
            ALPHA0[$n]="$(awk -v t="$t4k" -v n="$n" 'BEGIN { printf "%.9f\n", t / 1e6 / (2 * (n - 1)) }')"
        fi

        echo "# training: $n ranks, rate $rate, delay ${delay:-0}" >&2
        before="$(tx_total "$n")"
        "$CLUSTER" run --logdir "$OUT/$tag-train" -- --set run.steps="$TRAIN_STEPS" \
            --set run.eval_every=0 --set run.out_dir="$OUT/$tag-train/out" \
            >"$OUT/$tag-train.json"
        after="$(tx_total "$n")"
        summary="$(grep '^{' "$OUT/$tag-train.json" | tail -1)"
        sps="$(json_field "$summary" samples_per_s)"
        gb="$(json_field "$summary" global_batch)"
        wire="$(awk -v a="$after" -v b="$before" -v n="$n" -v s="$TRAIN_STEPS" \
            'BEGIN { printf "%.0f\n", (a - b) / n / s }')"
        if [[ $rate == none && -z $delay ]]; then
            STEP0[$n]="$(awk -v g="$gb" -v s="$sps" 'BEGIN { printf "%.9f\n", g / s }')"
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$rate" "${delay:-0}" "$sps" "$gb" "$wire" \
            >>"$TR_ROWS"
    done
    "$CLUSTER" down >&2
    # shellcheck disable=SC2034 # read by the EXIT trap
    UP=0
    printf '%s\t%s\t%s\n' "$n" "${ALPHA0[$n]:-}" "${STEP0[$n]:-}" >>"$OUT/fitted.tsv"
done

report
}

# One line, so that bash has read all it needs before running (safe to edit while running).
main "$@"; exit $?
