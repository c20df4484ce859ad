#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `dsl run launcher=slurm` and for the tests marked
# `slurm`. Needs root and Debian's packages: `apt-get install -y slurm-wlm munge`.
#
#   sudo scripts/slurm_localhost.sh          configure and start munged, slurmctld and slurmd (idempotent:
#                                            a second call leaves running daemons alone)
#   sudo scripts/slurm_localhost.sh stop     cancel every job and stop slurmctld, slurmd, and munged if this
#                                            script started it
#   scripts/slurm_localhost.sh status        sinfo, or a line saying SLURM does not answer
#
# The node is this host (named after `hostname`, with the CPUs and memory slurmd finds), in one partition
# `local`. Tested with SLURM 22.05 and munge 0.5 from Debian 12.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-localhost
RUN=/run/slurm-localhost
LOGS=/var/log/slurm-localhost
HOST=$(hostname)

die() { echo "slurm_localhost: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y slurm-wlm munge"
    done
}

config() {
    # slurmd -C describes this machine exactly as slurmd will register it (a node that claims more CPUs
    # or memory than slurmd finds is drained)
    local node mem_per_cpu cpus memory
    node=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem_per_cpu=$((memory / cpus))
    cat <<EOF
# Written by dsl's scripts/slurm_localhost.sh: a one-node cluster on $HOST.
ClusterName=localhost
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$mem_per_cpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive PIDFILE: the daemon that wrote it still runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    touch "$RUN/munged.ours"  # `stop` stops only a munged that this script started
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

wait_for_node() {
    for _ in $(seq 120); do
        case $(sinfo -h -n "$HOST" -o %t 2>/dev/null) in
            idle|mix|alloc) return ;;
            down*|drain*|drng*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $HOST did not become idle (see $LOGS/slurmctld.log and $LOGS/slurmd.log)"
}

start() {
    need_root "$@"
    install -d "$STATE/ctld" "$STATE/d" "$RUN" "$LOGS" /etc/slurm
    local wanted
    wanted=$(config)
    if [ "$(cat "$CONF" 2>/dev/null)" != "$wanted" ]; then
        stop_daemons  # a changed config needs fresh daemons
        printf '%s\n' "$wanted" >"$CONF"
    fi
    start_munge
    alive "$RUN/slurmctld.pid" || slurmctld
    alive "$RUN/slurmd.pid" || slurmd
    wait_for_node
    echo "slurm_localhost: node $HOST is up (sinfo; sbatch, srun and scontrol work; stop with: $0 stop)"
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid"; do
        alive "$pidfile" || continue
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

stop() {
    need_root "$@"
    if alive "$RUN/slurmctld.pid"; then
        scancel --full --user=root 2>/dev/null || true
        scancel --full 2>/dev/null || true
    fi
    stop_daemons
    if [ -e "$RUN/munged.ours" ] && alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
    fi
    rm -f "$RUN/munged.ours"
    echo "slurm_localhost: stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) timeout 10 sinfo || die "SLURM does not answer here (start it: sudo $0)" ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
