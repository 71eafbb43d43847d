#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd + munge), as root.
#
#   tests/slurm/start.sh          install if needed, write the config, start the daemons, wait until idle
#   tests/slurm/stop.sh           stop them again
#
# Idempotent: when the cluster is already up and idle, it returns at once.
# Exit codes: 0 up; 3 SLURM is not installed and cannot be installed; 4 a slurm.conf that this
# script did not write exists (a real cluster: left alone); 1 anything else (see the log lines).
#
# Environment:
#   SLURM_LOCAL_NO_INSTALL=1   never call apt-get
#   SLURM_LOCAL_STATE=DIR      state, spool and logs (default /var/lib/slurm-local)
set -euo pipefail

MARKER="# one-node localhost cluster written by tests/slurm/start.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE="${SLURM_LOCAL_STATE:-/var/lib/slurm-local}"
NODE="$(hostname -s)"

log() { echo "[slurm-local] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it starts slurmctld, slurmd and munged)"
    exit 3
fi

# -- install --------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
        log "SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)"
        exit 3
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >&2; then
        log "apt-get install failed"
        exit 3
    fi
fi

# -- config ---------------------------------------------------------------------------------------
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    log "$CONF exists and was not written by this script; not touching it"
    exit 4
fi

is_up() {
    # the node answers and is idle, mixed or allocated (i.e. usable)
    local st
    st="$(timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)" || return 1
    case "$st" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

if [ -f "$CONF" ] && is_up && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null; then
    exit 0
fi

# the node as slurmd sees it (CPUs, sockets, cores, threads), memory less 1 GB for the system
HW="$(slurmd -C | head -n1)"
CPUS="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")"
TOPO="$(grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' <<<"$HW")"
MEM_MB="$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
REAL_MB=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB / 2 ))
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log" /run/slurm-local
cat > "$CONF.tmp" <<CONF
$MARKER
ClusterName=localhost
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurm-local/slurmctld.pid
SlurmdPidFile=/run/slurm-local/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
NodeName=$NODE NodeAddr=127.0.0.1 $TOPO RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO DefMemPerCPU=$(( REAL_MB / CPUS / 2 ))
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
for d in slurmd slurmctld; do
    pid_file="/run/slurm-local/$d.pid"
    pid="$(cat "$pid_file" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done
slurmctld
slurmd

for _ in $(seq 120); do
    if is_up; then
        log "up: node $NODE, $CPUS CPUs, ${REAL_MB} MB (logs in $STATE/log)"
        exit 0
    fi
    st="$(timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true)"
    case "$st" in down*|drain*|fail*)
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
log "the node did not become idle within 60 s; last state: '$(sinfo -h -o %T 2>&1 | head -n1)'"
tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
