#!/usr/bin/env bash
# slurm/local/stop.sh - stop the cluster started by slurm/local/start.sh.
# Cancels this cluster's jobs, then kills exactly the PIDs recorded in
# $SLURM_LOCAL_ROOT/run/{slurmd,slurmd-<node>,slurmctld,munged}.pid (after checking each pid still
# belongs to that daemon).  Never kills by process name.
set -uo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm}
RUN=$ROOT/run
export SLURM_CONF=$ROOT/etc/slurm.conf
log() { echo "[slurm/local/stop $(date +%T)] $*" >&2; }

alive() {  # alive PID NAME
  local pid=$1 name=$2 state exe
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" != Z ] || return 1
  exe=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n1)
  [[ "$exe" == *"$name" ]]
}

# 1. cancel all jobs of this cluster so no slurmstepd/job processes are orphaned
if [ -s "$RUN/slurmctld.pid" ] && alive "$(cat "$RUN/slurmctld.pid")" slurmctld; then
  jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do
      [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# 2. stop daemons in dependency order - by recorded pid only
for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid "$RUN"/munged.pid; do
  [ -s "$f" ] || continue
  d=$(basename "$f" .pid); d=${d%%-*}
  pid=$(cat "$f")
  if alive "$pid" "$d"; then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do alive "$pid" "$d" || break; sleep 0.25; done
    if alive "$pid" "$d"; then log "$d ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid"; fi
    log "stopped $d (pid $pid)"
  else
    log "$d (pid $pid) not running"
  fi
  rm -f "$f" "${f%.pid}.self.pid"
done
