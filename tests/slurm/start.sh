#!/usr/bin/env bash
# Start a SLURM cluster on this machine (slurmctld + one slurmd per node + munge), as root.
#
#   tests/slurm/start.sh          install if needed, write the config, start the daemons, wait until idle
#   tests/slurm/stop.sh           stop them again
#
# One node by default (this host's name, /etc/slurm/slurm.conf, the standard ports). With
# SLURM_LOCAL_NODES="nodea nodeb" it is a multi-node cluster on this one host: a slurmd per node
# (``slurmd -N <name>``), every node NodeHostname=<this host> NodeAddr=127.0.0.1 and a port of its own.
# Node names need not resolve (the tests use names that do not, as on clusters whose node names are
# not in DNS). Such a cluster keeps its config out of /etc/slurm (SLURM_LOCAL_CONF, read by the
# clients through SLURM_CONF) and uses other ports, so it runs beside the one-node cluster.
#
# Idempotent: when the cluster is already up and idle, it returns at once.
# Exit codes: 0 up; 3 SLURM is not installed and cannot be installed; 4 a slurm.conf that this
# script did not write exists (a real cluster: left alone); 1 anything else (see the log lines).
#
# Environment:
#   SLURM_LOCAL_STATE=DIR      state, spool and logs (default /var/lib/slurm-local)
#   SLURM_LOCAL_NODES="a b"    node names (default: this host's short name, one node)
#   SLURM_LOCAL_CONF=FILE      the config written (default /etc/slurm/slurm.conf)
#   SLURM_LOCAL_PORT=N         slurmctld's port; the nodes' slurmd take N+1, N+2... (default 6817)
#   SLURM_LOCAL_CPUS=N         CPUs declared per node (default: the host's; several nodes share them)
set -euo pipefail

MARKER="# one-node localhost cluster written by tests/slurm/start.sh"
CONF="${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}"
CONF_DIR="$(dirname "$CONF")"
STATE="${SLURM_LOCAL_STATE:-/var/lib/slurm-local}"
HOST="$(hostname -s)"
read -r -a NODES <<<"${SLURM_LOCAL_NODES:-$HOST}"
NODE="${NODES[0]}"
PORT="${SLURM_LOCAL_PORT:-6817}"
# pid files per cluster: /run/slurm-local for the default one, /run/slurm-local-<port> for others
RUN_DIR=/run/slurm-local
[ "$PORT" = 6817 ] || RUN_DIR="/run/slurm-local-$PORT"
export SLURM_CONF="$CONF"
MULTI=0
if [ "${#NODES[@]}" -gt 1 ] || [ "$NODE" != "$HOST" ]; then MULTI=1; fi

log() { echo "[slurm-local] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it starts slurmctld, slurmd and munged)"
    exit 3
fi

# -- installed? (this script installs nothing: tools/install_system_packages.sh does, as root) ---------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    log "SLURM is not installed: bash tools/install_system_packages.sh (slurmctld slurmd slurm-client munge)"
    exit 3
fi

# -- config ---------------------------------------------------------------------------------------
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    log "$CONF exists and was not written by this script; not touching it"
    exit 4
fi

node_up() {
    # the node answers and is idle, mixed or allocated (i.e. usable)
    local st
    st="$(timeout 5 sinfo -h -n "$1" -o %T 2>/dev/null | head -n1)" || return 1
    case "$st" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}
is_up() {
    local n
    for n in "${NODES[@]}"; do node_up "$n" || return 1; done
}
pid_alive() { local pid; pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
daemons_alive() {
    local n
    pid_alive "$RUN_DIR/slurmctld.pid" || return 1
    if [ "$MULTI" = 1 ]; then
        for n in "${NODES[@]}"; do pid_alive "$RUN_DIR/slurmd-$n.pid" || return 1; done
    else
        pid_alive "$RUN_DIR/slurmd.pid" || return 1
    fi
}

if [ -f "$CONF" ] && daemons_alive && is_up; then
    exit 0
fi

# the node as slurmd sees it (CPUs, sockets, cores, threads), memory less 1 GB for the system
HW="$(slurmd -C | head -n1)"
CPUS="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")"
TOPO="$(grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' <<<"$HW")"
MEM_MB="$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
REAL_MB=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB / 2 ))
if [ -n "${SLURM_LOCAL_CPUS:-}" ]; then
    CPUS="$SLURM_LOCAL_CPUS"
    TOPO="CPUs=$CPUS"
fi
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log" "$RUN_DIR"
NODE_LINES=""
PART_MEM=$(( REAL_MB / CPUS / 2 ))
if [ "$MULTI" = 1 ]; then
    # several slurmd on this host: each its own port, spool, pid and log file (%n: the node's name)
    NODE_MB=$(( REAL_MB / ${#NODES[@]} ))
    PART_MEM=$(( NODE_MB / CPUS / 2 ))
    i=1
    for n in "${NODES[@]}"; do
        NODE_LINES+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(( PORT + i )) $TOPO RealMemory=$NODE_MB State=UNKNOWN"$'\n'
        i=$(( i + 1 ))
    done
    SLURMD_FILES="SlurmdSpoolDir=$STATE/d/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log"
    CLUSTER="localhost$PORT"
else
    NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 $TOPO RealMemory=$REAL_MB State=UNKNOWN"
    SLURMD_FILES="SlurmdSpoolDir=$STATE/d
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log"
    CLUSTER=localhost
fi
NODE_LIST="$(IFS=,; echo "${NODES[*]}")"
cat > "$CONF.tmp" <<CONF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
FirstJobId=$(( (PORT - 6817) * 100 + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
$SLURMD_FILES
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
MaxArraySize=1001
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
SchedulerParameters=defer_batch=0
$NODE_LINES
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO DefMemPerCPU=$PART_MEM
CONF
mv "$CONF.tmp" "$CONF"

# -- munge ----------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# -- daemons --------------------------------------------------------------------------------------
# a config written anew needs daemons that read it: restart whatever runs
for pid_file in "$RUN_DIR"/slurmd*.pid "$RUN_DIR/slurmctld.pid"; do
    pid="$(cat "$pid_file" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done
slurmctld -f "$CONF"
if [ "$MULTI" = 1 ]; then
    for n in "${NODES[@]}"; do mkdir -p "$STATE/d/$n"; slurmd -f "$CONF" -N "$n"; done
else
    slurmd -f "$CONF"
fi

for _ in $(seq 120); do
    if is_up; then
        log "up: node(s) ${NODES[*]}, $CPUS CPUs each, ${REAL_MB} MB (config $CONF, logs in $STATE/log)"
        exit 0
    fi
    for n in "${NODES[@]}"; do
        st="$(timeout 5 sinfo -h -n "$n" -o %T 2>/dev/null | head -n1 || true)"
        case "$st" in down*|drain*|fail*)
            scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
        esac
    done
    sleep 0.5
done
log "the node did not become idle within 60 s; last state: '$(sinfo -h -o %T 2>&1 | head -n1)'"
tail -n 20 "$STATE/log/slurmctld.log" "$STATE"/log/slurmd*.log >&2 || true
exit 1
