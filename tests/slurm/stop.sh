#!/usr/bin/env bash
# Stop the one-node localhost SLURM cluster started by tests/slurm/start.sh.
# Cancels its jobs, stops slurmd, slurmctld and munged (only the processes whose pid files it
# started with), and leaves the installation and the config in place. Idempotent.
#   --purge   also remove the state directory and the config it wrote
set -uo pipefail

MARKER="# one-node localhost cluster written by tests/slurm/start.sh"
CONF=/etc/slurm/slurm.conf
STATE="${SLURM_LOCAL_STATE:-/var/lib/slurm-local}"

if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "[slurm-local] $CONF was not written by start.sh; not stopping anything" >&2
    exit 4
fi

if command -v scancel >/dev/null && [ -s /run/slurm-local/slurmctld.pid ]; then
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
stop_pid_file /run/slurm-local/slurmd.pid
stop_pid_file /run/slurm-local/slurmctld.pid
# the job step daemons of killed jobs exit on their own once slurmd is gone; munged last
for f in /run/munge/munged.pid /var/run/munge/munged.pid; do stop_pid_file "$f"; done

if [ "${1:-}" = --purge ]; then
    rm -rf "$STATE"
    [ -f "$CONF" ] && rm -f "$CONF"
fi
exit 0
