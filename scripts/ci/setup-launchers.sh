#!/usr/bin/env bash
# Installs and starts the real launchers that tests/launchers.rs drives, on one machine:
# Open MPI's mpirun, and a single-node Slurm (slurmctld + slurmd, authenticated by munge).
# For Debian 12, run as root (CI does). Idempotent: packages already installed are kept, a
# munge key already present is kept, daemons already running are left running, and the
# script returns once `sinfo` reports this node idle (or fails after a bounded wait).
#
# Usage: scripts/ci/setup-launchers.sh
# Knobs: TESSERA_SLURM_CPUS (CPUs the node advertises, default 8, so `srun -n 4` fits on a
#        2-core machine; SlurmdParameters=config_overrides makes slurmd accept the lie),
#        TESSERA_SLURM_WAIT_S (how long to wait for the node to be idle, default 60).
set -euo pipefail

cpus="${TESSERA_SLURM_CPUS:-8}"
wait_s="${TESSERA_SLURM_WAIT_S:-60}"

say() { echo "setup-launchers: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"

# --- packages --------------------------------------------------------------------------------
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
# mpicc, for scripts/bench-mpi-allreduce.sh (the MPI peer of `tessera bench allreduce`).
command -v mpicc >/dev/null || need+=(libopenmpi-dev)
command -v munged >/dev/null || need+=(munge)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v srun >/dev/null || need+=(slurm-client)
if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- munge -----------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "the munge package did not create the munge user"
for d in /etc/munge /var/lib/munge /var/log/munge /run/munge; do
    mkdir -p "$d"
    chown munge:munge "$d"
done
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    if command -v mungekey >/dev/null; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm -----------------------------------------------------------------------------------
host="$(hostname -s)"
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
conf=/etc/slurm/slurm.conf
new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<CONF
# Written by scripts/ci/setup-launchers.sh: a single-node cluster for the launcher tests.
ClusterName=tessera-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
changed=0
if ! cmp -s "$new_conf" "$conf"; then
    say "writing $conf (node $host, $cpus CPUs)"
    install -m 0644 "$new_conf" "$conf"
    changed=1
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$changed" -eq 1 ]; then
    # A new config: restart whatever runs with the old one.
    for pf in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if running "$pf"; then
            pid="$(cat "$pf")"
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if ! running /run/slurm/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
if ! running /run/slurm/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

say "waiting up to ${wait_s}s for node $host to be idle"
deadline=$((SECONDS + wait_s))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle | mix | alloc) break ;;
        down* | drain* | inval*)
            scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle | mix | alloc) ;;
    *)
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        die "node $host is '${state:-unknown}' after ${wait_s}s, not idle (logs above)" ;;
esac
say "ready: mpirun $(command -v mpirun), srun $(command -v srun), node $host $state"
