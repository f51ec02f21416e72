# Sourced by the GPU session scripts (gpu-check.sh, gpu-bench-large.sh, gpu-ab.sh): `step`, which
# runs one command with a timeout inside a shared budget. Uses the caller's variables: `deadline`
# (SECONDS value at which the budget ends), `out` (log folder), and appends to `summary` and
# sets `status=1` on a failure.

# step NAME SECONDS CMD...: runs CMD with a timeout (at most what is left of the budget), logs to
# $out/NAME.log, records the result.
step() {
    local name="$1" secs="$2"
    shift 2
    local left=$((deadline - SECONDS))
    ((secs > left)) && secs=$left
    if ((secs < 5)); then
        summary+=("$(printf '%-14s %-12s %5ss' "$name" "SKIPPED" 0)")
        status=1
        return
    fi
    echo "=== $name (timeout ${secs}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local verdict="ok"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="TIMEOUT"; elif [[ $rc -ne 0 ]]; then verdict="FAIL(rc=$rc)"; fi
    [[ $verdict == ok ]] || status=1
    summary+=("$(printf '%-14s %-12s %5ss' "$name" "$verdict" $((SECONDS - t0)))")
}

# pack_logs NAME DIR: with $OUT set (the device tool's folder), packs DIR into $OUT/NAME.tar.gz:
# one file, since the tool brings back only a few.
pack_logs() {
    [[ -n "${OUT:-}" ]] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/$1.tar.gz" -C "$2" . && echo "$1: logs packed into $OUT/$1.tar.gz"
}
