#!/usr/bin/env bash
# A "cluster" of N nodes on one Linux machine: N network namespaces, each with one veth link to
# a hub namespace that routes between them (an L3 switch: proxy ARP, one /24), the links
# optionally shaped (bandwidth: tc tbf on both ends; one-way latency: tc netem, or where the
# kernel lacks netem, a user-space delay line on a TUN device in the hub, delayline.py), and a
# launcher that runs a Tessera job across them: a standalone coordinator in the hub, one
# `tessera rank` per node namespace, each binding its own veth address for the data plane.
#
#   cluster.sh up N [--rate RATE] [--delay DELAY] [--delay-mode auto|netem|tun] [--hostnames]
#   cluster.sh shape [--rate RATE] [--delay DELAY] [--delay-mode M]   relink a running cluster
#   cluster.sh status
#   cluster.sh run [--tessera PATH] [--logdir DIR] [--timeout S] [--port P] -- RANK_ARGS...
#   cluster.sh down
#
# RATE is a tc rate (100mbit, 1gbit, ...), DELAY a time (2ms, 500us). Every node's link is
# rate-limited in both directions (its own egress and the hub port's egress towards it), like a
# full-duplex NIC into a non-blocking switch; DELAY is added once per node-to-node path, so it
# is the one-way latency between two nodes (RTT 2·DELAY); traffic to the hub (coordinator) is
# not delayed. --delay-mode auto uses netem when the kernel has it, else the TUN line (needs
# python3 and /dev/net/tun; it passes TSO super-packets whole and moved ~300 MB/s in all, at
# one core, on a 2-core VM).
# Without --rate and --delay the links run at veth speed (CPU-bound). --hostnames gives each
# node namespace its own UTS namespace and hostname (<prefix>-nI), so the coordinator sees N
# hosts of one rank each instead of one host of N; each rank then sizes its thread pool as if
# it had the machine's cores to itself.
#
# `run` passes RANK_ARGS to `tessera rank`, e.g.
#   cluster.sh run -- --set run.steps=100 --set run.eval_every=0        (train the default job)
#   cluster.sh run -- --job bench-allreduce \
#       --job-args '{"sizes":"16M","iters":5,"warmup":1,"check":true,"json":true}'
# Rank 0's report (JSON summary or benchmark rows) is printed on stdout; every process's
# output is kept in --logdir. The binary is --tessera, else $TESSERA, else
# target/release/tessera of this repository.
#
# Environment: TSR_PREFIX (namespace name prefix, default "tsr"), TSR_NET (first three octets
# of the /24 used, default 10.77.0; node I is .I+1, the hub .254). Needs root and iproute2.

set -euo pipefail

PREFIX="${TSR_PREFIX:-tsr}"
NET="${TSR_NET:-10.77.0}"
HUB="$PREFIX-hub"
HUB_IP="$NET.254"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
STATE_DIR="${TMPDIR:-/tmp}/tessera-netns-$PREFIX"

die() {
    echo "cluster.sh: error: $*" >&2
    exit 1
}

need_root_and_tools() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, veth and tc need \
CAP_NET_ADMIN): run it with sudo"
    command -v ip >/dev/null || die "'ip' not found: install iproute2 (apt-get install iproute2)"
    command -v tc >/dev/null || die "'tc' not found: install iproute2 (apt-get install iproute2)"
    ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here (no network namespace \
support in this kernel or container?)"
}

node_ns() { echo "$PREFIX-n$1"; }
node_ip() { echo "$NET.$(($1 + 1))"; }

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

# The number of node namespaces of this prefix that exist (0 when the cluster is down).
count_nodes() {
    local n=0
    while ns_exists "$(node_ns "$n")"; do n=$((n + 1)); done
    echo "$n"
}

# Bytes per second of a tc rate such as 100mbit, 1gbit, 500kbit, 1000000bit.
rate_bytes_per_s() {
    local r="${1,,}" num unit
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)([kmg]?)(bit|bps)$ ]] || die "rate '$1' not understood: use \
e.g. 100mbit, 1gbit, 500kbit (bits per second) or 10mbps (bytes per second)"
    num="${BASH_REMATCH[1]}"
    unit="${BASH_REMATCH[3]}"
    awk -v n="$num" -v u="$unit" -v b="${BASH_REMATCH[4]}" 'BEGIN {
        m = (u == "k") ? 1e3 : (u == "m") ? 1e6 : (u == "g") ? 1e9 : 1;
        printf "%.0f\n", (b == "bit") ? n * m / 8 : n * m }'
}

hub_sysctl() {
    local kv
    for kv in "$@"; do
        ip netns exec "$HUB" sysctl -qw "$kv" >/dev/null || die "sysctl $kv in $HUB failed"
    done
}

have_netem() {
    # Probe on the hub's loopback (always there once up).
    ip netns exec "$HUB" tc qdisc add dev lo root netem delay 1ms >/dev/null 2>&1 || return 1
    ip netns exec "$HUB" tc qdisc del dev lo root >/dev/null 2>&1 || true
}

# shape_dev NS DEV RATE DELAY: replace DEV's root qdisc (empty RATE and DELAY: unshaped).
shape_dev() {
    local ns="$1" dev="$2" rate="$3" delay="$4" bps burst
    ip netns exec "$ns" tc qdisc del dev "$dev" root >/dev/null 2>&1 || true
    if [[ -n $rate ]]; then
        bps="$(rate_bytes_per_s "$rate")"
        # Bucket: 1 ms of traffic, at least 64 KiB so that a GSO super-packet fits whole.
        burst=$((bps / 1000))
        ((burst < 65536)) && burst=65536
    fi
    if [[ -n $delay ]]; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" \
            limit 100000 || die "tc netem on $ns/$dev failed"
        if [[ -n $rate ]]; then
            ip netns exec "$ns" tc qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$rate" \
                burst "$burst" latency 200ms || die "tc tbf on $ns/$dev failed"
        fi
    elif [[ -n $rate ]]; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" \
            latency 200ms || die "tc tbf on $ns/$dev failed"
    fi
}

parse_link_opts() {
    RATE=""
    DELAY=""
    HOSTNAMES=0
    DELAY_MODE=auto
    while (($#)); do
        case "$1" in
        --rate) RATE="${2:?--rate needs a value, e.g. 100mbit}"; shift 2 ;;
        --delay) DELAY="${2:?--delay needs a value, e.g. 2ms}"; shift 2 ;;
        --delay-mode) DELAY_MODE="${2:?--delay-mode needs auto, netem or tun}"; shift 2 ;;
        --hostnames) HOSTNAMES=1; shift ;;
        *) die "unknown option '$1' (expected --rate RATE, --delay DELAY, --delay-mode \
auto|netem|tun, --hostnames)" ;;
        esac
    done
    [[ $DELAY_MODE =~ ^(auto|netem|tun)$ ]] || die "--delay-mode must be auto, netem or tun"
    [[ -z $RATE ]] || rate_bytes_per_s "$RATE" >/dev/null
    [[ -z $DELAY || $DELAY == 0 || $DELAY == 0ms ]] || delay_us "$DELAY" >/dev/null
    [[ $DELAY == 0 || $DELAY == 0ms ]] && DELAY=""
    [[ $RATE == none || $RATE == 0 ]] && RATE=""
    return 0
}

# Microseconds of a tc time (2ms, 500us, 1s).
delay_us() {
    [[ $1 =~ ^([0-9]+(\.[0-9]+)?)(s|ms|us)$ ]] || die "delay '$1' not understood: use e.g. \
2ms, 500us"
    awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" \
        'BEGIN { printf "%.0f\n", n * ((u == "s") ? 1e6 : (u == "ms") ? 1e3 : 1) }'
}

# Stop the hub's tun delay line (if any) and its policy routes.
tun_delay_off() {
    local n="$1" i pid
    for ((i = 0; i < n; i++)); do
        ip -n "$HUB" rule del iif "p$i" lookup 100 pref 100 >/dev/null 2>&1 || true
    done
    ip -n "$HUB" route flush table 100 >/dev/null 2>&1 || true
    if [[ -f $STATE_DIR/delayline.pid ]]; then
        pid="$(cat "$STATE_DIR/delayline.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$STATE_DIR/delayline.pid"
    fi
}

# Route every packet that enters the hub from a node through delayline.py (a TUN device that
# hands each packet back DELAY later): one pass per node-to-node path, so DELAY is one-way.
# Traffic to the hub's own address (the coordinator) is delivered locally, undelayed.
tun_delay_on() {
    local n="$1" us i
    command -v python3 >/dev/null || die "--delay-mode tun needs python3 (for delayline.py)"
    [[ -c /dev/net/tun ]] || die "--delay-mode tun needs /dev/net/tun (kernel CONFIG_TUN)"
    us="$(delay_us "$DELAY")"
    ip netns exec "$HUB" python3 "$SCRIPT_DIR/delayline.py" tun0 "$us" \
        >"$STATE_DIR/delayline.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/delayline.pid"
    for _ in $(seq 50); do
        ip -n "$HUB" link show tun0 >/dev/null 2>&1 && break
        kill -0 "$(cat "$STATE_DIR/delayline.pid")" 2>/dev/null ||
            die "delayline.py exited: $(cat "$STATE_DIR/delayline.log")"
        sleep 0.1
    done
    ip -n "$HUB" link show tun0 >/dev/null 2>&1 || die "delayline.py did not create tun0 in 5 s"
    hub_sysctl net.ipv4.conf.tun0.rp_filter=0
    ip -n "$HUB" link set tun0 up
    ip -n "$HUB" route add default dev tun0 table 100
    for ((i = 0; i < n; i++)); do
        ip -n "$HUB" rule add iif "p$i" lookup 100 pref 100
    done
}

apply_shape() {
    local n="$1" i mode="$DELAY_MODE" node_delay=""
    mkdir -p "$STATE_DIR"
    if [[ -n $DELAY && $mode == auto ]]; then
        if have_netem; then mode=netem; else mode=tun; fi
    fi
    if [[ -n $DELAY && $mode == netem ]] && ! have_netem; then
        die "--delay-mode netem needs the kernel's netem qdisc (sch_netem), which this kernel \
does not have (tc: 'Specified qdisc kind is unknown'); load it (modprobe sch_netem) or use \
--delay-mode tun"
    fi
    tun_delay_off "$n"
    [[ -n $DELAY && $mode == netem ]] && node_delay="$DELAY"
    # Rate on both ends of every link. A netem delay goes on the node's egress only, so that
    # DELAY is the one-way latency between any two nodes (RTT 2·DELAY), as with the tun line.
    for ((i = 0; i < n; i++)); do
        shape_dev "$(node_ns "$i")" eth0 "$RATE" "$node_delay"
        shape_dev "$HUB" "p$i" "$RATE" ""
    done
    [[ -n $DELAY && $mode == tun ]] && tun_delay_on "$n"
    printf 'rate=%s\ndelay=%s\ndelay_mode=%s\n' "${RATE:-none}" "${DELAY:-0}" \
        "$([[ -n $DELAY ]] && echo "$mode" || echo none)" >"$STATE_DIR/links"
}

cmd_up() {
    local n="${1:-}"
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 64)); then
        die "usage: cluster.sh up N [--rate RATE] [--delay DELAY] [--delay-mode auto|netem|tun] \
[--hostnames] (N: 1..64 nodes, e.g. 4)"
    fi
    shift
    parse_link_opts "$@"
    need_root_and_tools
    if ns_exists "$HUB" || (($(count_nodes) > 0)); then
        die "a cluster with prefix '$PREFIX' is already up: run 'cluster.sh down' first (or set \
TSR_PREFIX to run another one)"
    fi
    # From here on, a failure (set -e, or die) tears down what was built.
    UP_DONE=0
    trap 'if ((!UP_DONE)); then echo "cluster.sh: up failed; removing what was built" >&2;
          cmd_down >/dev/null 2>&1; fi' EXIT
    mkdir -p "$STATE_DIR"
    # The hub is a router with proxy ARP on its ports (an L3 switch): the nodes share one /24
    # and reach each other and the hub's own address through it. Routing, unlike a bridge,
    # lets the tun delay line take the node-to-node traffic by policy routing.
    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    hub_sysctl net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
        net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0 \
        net.ipv4.conf.default.send_redirects=0
    ip -n "$HUB" addr add "$HUB_IP/32" dev lo
    local i ns
    for ((i = 0; i < n; i++)); do
        ns="$(node_ns "$i")"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip link add name eth0 netns "$ns" type veth peer name "p$i" netns "$HUB"
        ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        hub_sysctl "net.ipv4.conf.p$i.proxy_arp=1" "net.ipv4.conf.p$i.rp_filter=0"
        ip -n "$HUB" link set "p$i" up
        ip -n "$HUB" route add "$(node_ip "$i")/32" dev "p$i"
    done
    apply_shape "$n"
    echo "$HOSTNAMES" >"$STATE_DIR/hostnames"
    # shellcheck disable=SC2034 # read by the EXIT trap
    UP_DONE=1
    echo "cluster '$PREFIX' up: $n nodes ($(node_ip 0) .. $(node_ip $((n - 1)))), hub $HUB_IP," \
        "links: rate ${RATE:-unlimited}, delay ${DELAY:-none}"
}

cmd_shape() {
    parse_link_opts "$@"
    need_root_and_tools
    local n
    n="$(count_nodes)"
    ((n > 0)) || die "no cluster with prefix '$PREFIX' is up: run 'cluster.sh up N' first"
    apply_shape "$n"
    echo "cluster '$PREFIX': links now rate ${RATE:-unlimited}, delay ${DELAY:-none}"
}

cmd_status() {
    need_root_and_tools
    local n i ns
    n="$(count_nodes)"
    if ((n == 0)) && ! ns_exists "$HUB"; then
        echo "cluster '$PREFIX': down"
        return 0
    fi
    echo "cluster '$PREFIX': $n nodes; $(tr '\n' ' ' <"$STATE_DIR/links" 2>/dev/null || true)"
    for ((i = 0; i < n; i++)); do
        ns="$(node_ns "$i")"
        printf '  %-10s %-15s %s\n' "$ns" "$(node_ip "$i")" \
            "$(ip netns exec "$ns" tc qdisc show dev eth0 | head -1)"
    done
}

cmd_down() {
    command -v ip >/dev/null || die "'ip' not found: install iproute2"
    [[ $(id -u) -eq 0 ]] || die "must run as root to remove namespaces"
    local ns pid
    # Every namespace of this prefix, whether or not the cluster came up completely.
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(hub|n[0-9]+)$" || true); do
        # Processes still running inside (ranks, coordinator): TERM, then KILL, by pid.
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -TERM "$pid" 2>/dev/null || true
        done
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            [[ -z $(ip netns pids "$ns" 2>/dev/null || true) ]] && break
            sleep 0.2
        done
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        # Deleting a namespace destroys its veth ends (and so their peers).
        ip netns del "$ns" 2>/dev/null || echo "cluster.sh: could not delete namespace $ns" >&2
    done
    rm -rf "$STATE_DIR"
    echo "cluster '$PREFIX': down"
}

cmd_run() {
    local tessera="${TESSERA:-$REPO_ROOT/target/release/tessera}" logdir="" timeout_s=600
    local port=29400
    while (($#)); do
        case "$1" in
        --tessera) tessera="${2:?--tessera needs a path}"; shift 2 ;;
        --logdir) logdir="${2:?--logdir needs a directory}"; shift 2 ;;
        --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
        --port) port="${2:?--port needs a number}"; shift 2 ;;
        --) shift; break ;;
        *) die "unknown option '$1' before '--' (expected --tessera, --logdir, --timeout, \
--port; the rank's own arguments go after --)" ;;
        esac
    done
    need_root_and_tools
    [[ -x $tessera ]] || die "tessera binary '$tessera' not found or not executable: build it \
(cargo build --release -p tessera-launch --bin tessera) or pass --tessera PATH / set TESSERA"
    tessera="$(cd "$(dirname "$tessera")" && pwd)/$(basename "$tessera")"
    local n
    n="$(count_nodes)"
    ((n > 0)) || die "no cluster with prefix '$PREFIX' is up: run 'cluster.sh up N' first"
    [[ -n $logdir ]] || logdir="$(mktemp -d "${TMPDIR:-/tmp}/tessera-netns-run.XXXXXX")"
    mkdir -p "$logdir"
    local hostnames=0
    [[ -f $STATE_DIR/hostnames ]] && hostnames="$(cat "$STATE_DIR/hostnames")"
    local token
    token="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
    local coord="$HUB_IP:$port"

    local -a pids=()
    local coord_pid
    cleanup_run() {
        local p
        for p in "${pids[@]}" ${coord_pid:+"$coord_pid"}; do kill -TERM "$p" 2>/dev/null || true; done
    }
    trap 'cleanup_run; exit 130' INT TERM

    TESSERA_TOKEN="$token" timeout "$timeout_s" ip netns exec "$HUB" "$tessera" coordinator \
        --bind "$coord" --world "$n" --join-timeout 60 >"$logdir/coordinator.log" 2>&1 &
    coord_pid=$!
    local waited=0
    until grep -q "listening on" "$logdir/coordinator.log" 2>/dev/null; do
        if ! kill -0 "$coord_pid" 2>/dev/null; then
            cat "$logdir/coordinator.log" >&2
            die "the coordinator exited before listening on $coord (see above)"
        fi
        ((waited++ < 100)) || { cleanup_run; die "the coordinator did not listen on $coord in 10 s"; }
        sleep 0.1
    done

    local i ns
    for ((i = 0; i < n; i++)); do
        ns="$(node_ns "$i")"
        local -a pre=(ip netns exec "$ns")
        if ((hostnames)); then
            # shellcheck disable=SC2016 # expanded by that sh, not here
            pre+=(unshare --uts sh -c 'hostname "$0" && exec "$@"' "$ns")
        fi
        # Rank i runs on node i; the coordinator is the hub's, so every rank only joins it.
        TESSERA_COORDINATOR="$coord" TESSERA_TOKEN="$token" TESSERA_COORDINATOR_MODE=join \
            TESSERA_LAUNCH_RANK="$i" TESSERA_LAUNCH_WORLD="$n" timeout "$timeout_s" "${pre[@]}" "$tessera" rank "$@" \
            >"$logdir/rank$i.out" 2>"$logdir/rank$i.err" </dev/null &
        pids+=($!)
    done

    # Wait for the ranks in the order they end; on the first failure stop everyone else (the
    # coordinator would otherwise wait out its join timeout for a rank that never comes).
    local -A rank_of=()
    for ((i = 0; i < n; i++)); do rank_of[${pids[$i]}]=$i; done
    local failed=() live=("${pids[@]}") rc done_pid p stopping=0
    while ((${#live[@]})); do
        rc=0
        done_pid=""
        wait -n -p done_pid "${live[@]}" || rc=$?
        [[ -n $done_pid ]] || break
        i="${rank_of[$done_pid]}"
        local rest=()
        for p in "${live[@]}"; do [[ $p == "$done_pid" ]] || rest+=("$p"); done
        live=("${rest[@]}")
        if ((rc == 124)); then
            failed+=("rank $i (timed out after ${timeout_s} s)")
        elif ((rc != 0 && !stopping)); then
            failed+=("rank $i (exit $rc)")
        fi
        if ((rc != 0 && !stopping)); then
            stopping=1
            for p in "${live[@]}" "$coord_pid"; do kill -TERM "$p" 2>/dev/null || true; done
        fi
    done
    rc=0
    wait "$coord_pid" || rc=$?
    ((rc == 0 || stopping)) || failed+=("coordinator (exit $rc)")
    trap - INT TERM
    if ((${#failed[@]})); then
        echo "cluster.sh: run failed: ${failed[*]}; the other processes were stopped; logs in \
$logdir" >&2
        for ((i = 0; i < n; i++)); do
            if [[ -s $logdir/rank$i.err ]]; then
                echo "--- rank $i stderr (last lines) ---" >&2
                tail -n 5 "$logdir/rank$i.err" >&2
            fi
        done
        echo "--- coordinator ---" >&2
        tail -n 5 "$logdir/coordinator.log" >&2
        return 1
    fi
    cat "$logdir/rank0.out"
    echo "cluster.sh: $n ranks finished; logs in $logdir" >&2
}

main() {
    local cmd="${1:-}"
    (($#)) && shift
    case "$cmd" in
    up) cmd_up "$@" ;;
    shape) cmd_shape "$@" ;;
    status) cmd_status ;;
    run) cmd_run "$@" ;;
    down) cmd_down ;;
    -h | --help | help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" ;;
    *) die "usage: cluster.sh up N [--rate R] [--delay D] [--delay-mode M] [--hostnames] | \
shape [--rate R] [--delay D] [--delay-mode M] | status | run [--tessera PATH] [--logdir DIR] \
[--timeout S] [--port P] -- ARGS | down (see cluster.sh --help)" ;;
    esac
}

# One line, so that bash has read all it needs before running (safe to edit while running).
main "$@"; exit $?
