#!/usr/bin/env bash
# A short fuzz run of the parsers that read untrusted bytes: the shard reader, the checkpoint
# reader, the safetensors reader of model.init_from, the data-plane frame decoder and the
# data-plane handshake (targets in fuzz/). Installs cargo-fuzz if missing,
# seeds each corpus with valid inputs made here, runs each target for FUZZ_SECONDS (default 20)
# and fails on any crash, panic, leak, timeout or oversized allocation (libFuzzer's
# -malloc_limit_mb). Crashing inputs are left in fuzz/artifacts/<target>/.
#
# Usage: scripts/ci/fuzz.sh [target...]     (default: every target)
# FUZZ_SECONDS: time per target (default 20). FUZZ_SANITIZER: address (default; catches memory
# errors in unsafe code, e.g. rkyv's, but builds about twice as slowly) or none.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
# cargo-fuzz passes -Z flags (sanitizers, coverage) to rustc; this lets the stable toolchain
# accept them, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# Little-endian byte strings for printf.
le() { # le VALUE NBYTES
    local v=$1 n=$2 i out=""
    for ((i = 0; i < n; i++)); do out+=$(printf '\\x%02x' $(((v >> (8 * i)) & 255))); done
    printf '%s' "$out"
}
put() { printf "$2" >"$1"; }

seed_frame() {
    local d=$1 magic hdr
    magic=$(le $((0x54535246)) 4)
    # Data frames: all_reduce_f32 #3 of 16 bytes in a 64-byte collective, and a barrier.
    put "$d/data" "$magic$(le 1 2)$(le 0 2)$(le 3 8)$(le 16 8)$(le 64 8)$(le 0 16)"
    put "$d/barrier" "$magic$(le 8 2)$(le 0 2)$(le 0 8)$(le 0 8)$(le 0 8)"
    # Abort frame: rank 1 disconnected, reported with a message.
    hdr="$magic$(le 4 2)$(le 1 2)$(le 9 8)$(le 13 8)$(le 0 8)"
    put "$d/abort" "$hdr$(le 1 1)$(le 1 8)gone"
    put "$d/abort-timeout" "$hdr$(le 2 1)$(le 0 8)slow"
}

seed_handshake() {
    local d=$1 tag
    # The byte-order tag 0x01020304 in this machine's order (little-endian here).
    tag=$(le $((0x01020304)) 4)
    put "$d/hello" "TSRHELO1$tag$(le 0 4)$(le $((0x1234abcd)) 8)$(le 4 8)$(le 3 8)$(le 0 8)"
    put "$d/hello-rank0" "TSRHELO1$tag$(le 0 4)$(le 7 8)$(le 2 8)$(le 0 8)$(le 0 8)"
}

npy() { # npy FILE DESCR SHAPE BODY: a version-1.0 .npy file (BODY in printf escapes)
    local dict="{'descr': '$2', 'fortran_order': False, 'shape': $3, }"
    local pad=$(((64 - (10 + ${#dict} + 1) % 64) % 64))
    {
        printf '\x93NUMPY\x01\x00'
        printf "$(le $((${#dict} + pad + 1)) 2)"
        printf '%s%*s\n' "$dict" "$pad" ""
        printf "$4"
    } >"$1"
}

seed_shard() {
    local d=$1 tmp one zero
    tmp=$(mktemp -d)
    cargo run --release --quiet -p tessera-launch -- data synth --n-train 6 --n-eval 3 \
        --latent-dim 2 --dim-a 3 --dim-b 2 --seed 1 --out "$tmp" >/dev/null
    cp "$tmp/train.shard" "$d/paired-train"
    cp "$tmp/eval.shard" "$d/paired-eval"
    one='\x00\x00\x80\x3f'
    zero='\x00\x00\x00\x00'
    npy "$tmp/x.npy" '<f4' '(4, 2)' "$one$zero$zero$one$one$one$zero$zero"
    npy "$tmp/y.npy" '|u1' '(4,)' '\x00\x01\x02\x01'
    cargo run --release --quiet -p tessera-launch -- data import --features "$tmp/x.npy" \
        --labels "$tmp/y.npy" --out "$d/labeled" >/dev/null
    rm -rf "$tmp"
}

# Two steps of a tiny dual encoder into folder $1: a checkpoint of a few KiB.
tiny_run() {
    cargo run --release --quiet -p tessera-launch -- run --nproc 1 --set run.steps=2 \
        --set run.eval_every=0 --set "run.out_dir=\"$1\"" --set data.synth.latent_dim=2 \
        --set data.synth.dim_a=3 --set data.synth.dim_b=2 --set model.tower_a.input_dim=3 \
        --set model.tower_b.input_dim=2 --set model.tower_a.width=4 --set model.tower_b.width=4 \
        --set model.tower_a.depth=1 --set model.tower_b.depth=1 \
        --set model.tower_a.output_dim=2 --set model.tower_b.output_dim=2 >/dev/null 2>&1
}

seed_checkpoint() {
    local d=$1 tmp
    tmp=$(mktemp -d)
    tiny_run "$tmp"
    cp "$tmp"/checkpoints/ckpt-*.tsr "$d/"
    rm -rf "$tmp"
}

seed_safetensors() {
    local d=$1 tmp
    tmp=$(mktemp -d)
    # The tiny run's parameters as `tessera export` writes them, and an empty file.
    tiny_run "$tmp"
    cargo run --release --quiet -p tessera-launch -- export --safetensors "$d/model.safetensors" \
        --dir "$tmp" >/dev/null 2>&1
    put "$d/empty.safetensors" "$(le 2 8){}"
    rm -rf "$tmp"
}

start=$(date +%s)
echo "fuzz: building the targets"
# -a: debug assertions on, so that integer overflow is a crash too.
cargo fuzz build --fuzz-dir fuzz -O -a -s "$sanitizer"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus"
    case "$t" in
        shard) seed_shard "$corpus" ;;
        frame) seed_frame "$corpus" ;;
        handshake) seed_handshake "$corpus" ;;
        checkpoint) seed_checkpoint "$corpus" ;;
        safetensors) seed_safetensors "$corpus" ;;
    esac
    echo "fuzz: $t for ${secs}s ($(find "$corpus" -type f | wc -l) corpus inputs)"
    rc=0
    cargo fuzz run --fuzz-dir fuzz -O -a -s "$sanitizer" "$t" "$corpus" -- -max_total_time="$secs" \
        -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 -print_final_stats=1 >"$log" 2>&1 ||
        rc=$?
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)|DONE' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz: target $t FAILED (exit $rc); the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "fuzz: all targets passed in $(($(date +%s) - start)) s"
