#!/usr/bin/env bash
# Stop a localhost SLURM cluster started by tests/slurm/start.sh (the same SLURM_LOCAL_* variables name
# which: the one-node cluster by default, a multi-node one with SLURM_LOCAL_CONF / SLURM_LOCAL_PORT).
# Cancels its jobs, stops its slurmd(s) and slurmctld (only the processes whose pid files it started
# with), and munged unless another cluster started by start.sh still runs. Leaves the installation and the
# config in place. Idempotent.
#   --purge   also remove the state directory, the config it wrote and the empty pid directory
set -uo pipefail

MARKER="# one-node localhost cluster written by tests/slurm/start.sh"
CONF="${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}"
STATE="${SLURM_LOCAL_STATE:-/var/lib/slurm-local}"
PORT="${SLURM_LOCAL_PORT:-6817}"
RUN_DIR=/run/slurm-local
[ "$PORT" = 6817 ] || RUN_DIR="/run/slurm-local-$PORT"
export SLURM_CONF="$CONF"

if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "[slurm-local] $CONF was not written by start.sh; not stopping anything" >&2
    exit 4
fi

if command -v scancel >/dev/null && [ -s "$RUN_DIR/slurmctld.pid" ]; then
    timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
fi

stop_pid_file() {
    local f="$1" pid
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
}
for f in "$RUN_DIR"/slurmd*.pid; do stop_pid_file "$f"; done
stop_pid_file "$RUN_DIR/slurmctld.pid"
# the job step daemons of killed jobs exit on their own once slurmd is gone; munged last, when no other
# cluster of start.sh's still needs it
others=0
for f in /run/slurm-local*/slurmctld.pid; do
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && others=1
done
if [ "$others" = 0 ]; then
    for f in /run/munge/munged.pid /var/run/munge/munged.pid; do stop_pid_file "$f"; done
fi

if [ "${1:-}" = --purge ]; then
    rm -rf "$STATE"
    [ -f "$CONF" ] && rm -f "$CONF"
    rmdir "$RUN_DIR" 2>/dev/null || true     # its pid files are gone; left only if something else is in it
fi
exit 0
