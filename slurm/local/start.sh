#!/usr/bin/env bash
# slurm/local/start.sh - install (if missing), configure and start a single-node
# SLURM cluster (munged + slurmctld + slurmd) on this machine WITHOUT systemd, for the
# tests in tests/slurm/ and for trying the sbatch templates locally.  Adapted from the
# team's shared tools/local-slurm/start-local-slurm.sh (accounting/slurmdbd removed).
#
# Idempotent: if the daemons recorded in $SLURM_LOCAL_ROOT/run/*.pid are alive it
# only re-checks that the node is usable (restarting any daemon that died).  slurm.conf is
# (re)written only when slurmctld and slurmd are both down, so stop the cluster before
# changing the settings below.  Stop with slurm/local/stop.sh, which kills exactly the
# PIDs recorded here.
#
# Tunables (environment variables):
#   SLURM_LOCAL_ROOT        all config/state/logs/pids live here       (default /tmp/slurm)
#   SLURM_LOCAL_CPUS        CPUs advertised for the node              (default: real, from slurmd -C)
#   SLURM_LOCAL_MEM_MB      RealMemory advertised (MB)                (default: real, from slurmd -C)
#   SLURM_LOCAL_GPUS        number of FAKE gpu GRES to advertise per node (default 0)
#   SLURM_LOCAL_NODES       1 = one node "localhost"; N > 1 = nodes node1..nodeN, one slurmd each on
#                           ports SLURMD_PORT..SLURMD_PORT+N-1, all on this host (multi-node jobs)
#   SLURM_LOCAL_CTLD_PORT   slurmctld port                            (default 6817)
#   SLURM_LOCAL_SLURMD_PORT slurmd port                               (default 6818)
#   SLURM_LOCAL_KEEP_STATE  1 = keep controller state/job ids across restarts (default 0 = wipe)
#   SLURM_LOCAL_LINK_ETC    1 = also symlink /etc/slurm/slurm.conf -> generated conf (default 0)
#   SLURM_LOCAL_WAIT_S      seconds to wait for the node to become idle (default 60)
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
GPUS=${SLURM_LOCAL_GPUS:-0}
NODES=${SLURM_LOCAL_NODES:-1}
if [ "$NODES" = 1 ]; then NODE_NAMES=(localhost); NODE_SET=localhost
else NODE_NAMES=($(seq -f 'node%g' 1 "$NODES")); NODE_SET="node[1-$NODES]"; fi
slurmd_pidfile() { if [ "$NODES" = 1 ]; then echo "$RUN/slurmd.pid"; else echo "$RUN/slurmd-$1.pid"; fi; }
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CONF=$ROOT/etc/slurm.conf
RUN=$ROOT/run
LOG=$ROOT/log
MUNGE_DIR=$ROOT/munge
MUNGE_SOCK=$MUNGE_DIR/run/munge.socket.2
export SLURM_CONF=$CONF

log() { echo "[slurm/local/start $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd needs root)"

# alive PIDFILE NAME : true if the pid in PIDFILE is a live (non-zombie) process whose argv[0] ends in NAME
alive() {
  local pidfile=$1 name=$2 pid state exe
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" != Z ] || return 1
  exe=$(tr '\0' '\n' < "/proc/$pid/cmdline" | head -n1)
  [[ "$exe" == *"$name" ]]
}

# ---------------------------------------------------------------- 1. packages
need_install=0
for b in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch; do
  [ -x "$b" ] || need_install=1
done
pkgs="slurm-wlm munge"
if [ "$need_install" = 1 ]; then
  log "installing $pkgs (apt) ..."
  # keep maintainer scripts from trying to start the distro services (no systemd here)
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
getent passwd munge >/dev/null || die "user 'munge' missing (munge package broken?)"

mkdir -p "$ROOT/etc" "$RUN" "$LOG" "$ROOT/state/ctld" "$ROOT/state/slurmd" \
         "$MUNGE_DIR/etc" "$MUNGE_DIR/run" "$MUNGE_DIR/lib" "$MUNGE_DIR/log"

# ---------------------------------------------------------------- 2. munged (private socket)
chown -R munge:munge "$MUNGE_DIR"; chmod 0700 "$MUNGE_DIR/etc" "$MUNGE_DIR/lib" "$MUNGE_DIR/log"
chmod 0755 "$MUNGE_DIR" "$MUNGE_DIR/run"
if [ ! -s "$MUNGE_DIR/etc/munge.key" ]; then
  dd if=/dev/urandom of="$MUNGE_DIR/etc/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$MUNGE_DIR/etc/munge.key"; chmod 0400 "$MUNGE_DIR/etc/munge.key"
fi
if alive "$RUN/munged.pid" munged; then
  log "munged already running (pid $(cat "$RUN/munged.pid"))"
else
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  nohup setpriv --reuid=munge --regid=munge --init-groups \
    /usr/sbin/munged --foreground --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/etc/munge.key" \
      --pid-file="$MUNGE_DIR/run/munged.pid" --seed-file="$MUNGE_DIR/lib/munged.seed" \
      --log-file="$MUNGE_DIR/log/munged.log" \
    >"$LOG/munged.out" 2>&1 </dev/null &
  echo $! > "$RUN/munged.pid"     # setpriv execs munged, so $! is munged's pid
  log "started munged pid $(cat "$RUN/munged.pid")"
fi
for _ in $(seq 1 50); do
  munge -n --socket="$MUNGE_SOCK" 2>/dev/null | unmunge --socket="$MUNGE_SOCK" >/dev/null 2>&1 && break
  sleep 0.2
done
munge -n --socket="$MUNGE_SOCK" | unmunge --socket="$MUNGE_SOCK" >/dev/null || die "munged not working, see $LOG/munged.out"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- 3. slurm.conf
ctld_up=0; slurmd_up=0
alive "$RUN/slurmctld.pid" slurmctld && ctld_up=1
for node in "${NODE_NAMES[@]}"; do alive "$(slurmd_pidfile "$node")" slurmd && slurmd_up=1; done

if [ "$ctld_up" = 0 ] && [ "$slurmd_up" = 0 ]; then
  # fresh start: (re)write the config, optionally wipe old state
  hw=$(/usr/sbin/slurmd -C | head -n1)
  hw_cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  hw_mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  CPUS=${SLURM_LOCAL_CPUS:-$hw_cpus}
  MEM=${SLURM_LOCAL_MEM_MB:-$hw_mem}
  DEFMEM=$(( MEM / CPUS )); [ "$DEFMEM" -gt 1024 ] && DEFMEM=1024
  gres_line=""; node_gres=""
  if [ "$GPUS" -gt 0 ]; then
    # slurmd drops file-less GPUs ("Removing file-less GPU"), and File= must be a char/block
    # device: use symlinks to /dev/null as fake GPU device files.
    gres_line="GresTypes=gpu"; node_gres=" Gres=gpu:$GPUS"
    rm -rf "$ROOT/fakegpu"; mkdir -p "$ROOT/fakegpu"
    for i in $(seq 0 $(( GPUS - 1 ))); do ln -s /dev/null "$ROOT/fakegpu/nvidia$i"; done
    printf 'NodeName=%s Name=gpu File=%s/fakegpu/nvidia[0-%s]\n' "$NODE_SET" "$ROOT" $(( GPUS - 1 )) > "$ROOT/etc/gres.conf"
  else
    rm -f "$ROOT/etc/gres.conf"
  fi
  if [ "${SLURM_LOCAL_KEEP_STATE:-0}" != 1 ]; then
    rm -rf "${ROOT:?}/state/ctld/"* "${ROOT:?}/state/slurmd/"*
  fi
  if [ "$NODES" = 1 ]; then
    node_lines="NodeName=localhost CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM$node_gres State=UNKNOWN"
    per_node=""
  else
    # several slurmd on one host: each its own port; spool, pid and log files per node (%n)
    MEM=$(( MEM / NODES )); DEFMEM=$(( MEM / CPUS )); [ "$DEFMEM" -gt 1024 ] && DEFMEM=1024
    node_lines=""
    for i in $(seq 1 "$NODES"); do
      node_lines+="NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( SLURMD_PORT + i - 1 )) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM$node_gres State=UNKNOWN"$'\n'
    done
    per_node="-%n"
  fi
  cat > "$CONF" <<EOF
# generated by slurm/local/start.sh - single-node test cluster, no systemd, no cgroups
ClusterName=localcluster
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged socket; cred_expire also sets how long a requeued job waits (default 120 s, min 5)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$ROOT/state/ctld
SlurmdSpoolDir=$ROOT/state/slurmd$per_node
SlurmctldPidFile=$RUN/slurmctld.self.pid
SlurmdPidFile=$RUN/slurmd$per_node.self.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd$per_node.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: track processes via /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# no slurmdbd: sacct does not work; finished jobs are logged to the jobcomp file
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
# accept the NodeName line below even if it claims more CPUs/memory than the hardware has
SlurmdParameters=config_overrides
# preemption: jobs in 'urgent' requeue jobs in 'debug'; --signal is sent at preemption time
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$gres_line
$node_lines
PartitionName=debug Nodes=$NODE_SET Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=$NODE_SET Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  log "wrote $CONF (nodes=$NODE_SET CPUs=$CPUS RealMemory=$MEM gpus=$GPUS per node)"
fi
if [ "${SLURM_LOCAL_LINK_ETC:-0}" = 1 ]; then
  mkdir -p /etc/slurm
  if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  else
    log "WARNING: /etc/slurm/slurm.conf exists and is not a symlink; not touching it"
  fi
fi

# ---------------------------------------------------------------- 4. daemons
if [ "$ctld_up" = 0 ]; then
  port_busy "$CTLD_PORT" && die "port $CTLD_PORT already in use (another slurmctld?); set SLURM_LOCAL_CTLD_PORT"
  nohup /usr/sbin/slurmctld -D -f "$CONF" >"$LOG/slurmctld.out" 2>&1 </dev/null &
  echo $! > "$RUN/slurmctld.pid"
  log "started slurmctld pid $(cat "$RUN/slurmctld.pid")"
else
  log "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
fi
for i in "${!NODE_NAMES[@]}"; do
  node=${NODE_NAMES[$i]}; port=$(( SLURMD_PORT + i )); pidfile=$(slurmd_pidfile "$node")
  if alive "$pidfile" slurmd; then
    log "slurmd $node already running (pid $(cat "$pidfile"))"
    continue
  fi
  port_busy "$port" && die "port $port already in use (another slurmd?); set SLURM_LOCAL_SLURMD_PORT"
  [ "$NODES" = 1 ] || mkdir -p "$ROOT/state/slurmd-$node"
  nohup /usr/sbin/slurmd -D -N "$node" -f "$CONF" >"$LOG/slurmd-$node.out" 2>&1 </dev/null &
  echo $! > "$pidfile"
  log "started slurmd $node pid $(cat "$pidfile")"
done

# ---------------------------------------------------------------- 5. wait for idle node
state=""
for _ in $(seq 1 $(( WAIT_S * 2 ))); do
  # every node up: the distinct states of all nodes are all usable ones
  state=$(sinfo -h -N -n "$NODE_SET" -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  [ -n "$state" ] && [ -z "$(tr ' ' '\n' <<<"$state" | grep -Ev '^(idle|mixed|allocated|completing)?$')" ] && break
  case "$state" in
    *drain*|*down*) scontrol update NodeName="$NODE_SET" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  alive "$RUN/slurmctld.pid" slurmctld || die "slurmctld died, see $LOG/slurmctld.out"
  for node in "${NODE_NAMES[@]}"; do
    alive "$(slurmd_pidfile "$node")" slurmd || die "slurmd $node died, see $LOG/slurmd-$node.out"
  done
  sleep 0.5
  state="not ready: $state"
done
case "$state" in
  "not ready"*|"") die "nodes not ready after ${WAIT_S}s ($state); see $LOG/" ;;
esac

cat > "$ROOT/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
log "cluster ready: $NODE_SET $state"
sinfo >&2
cat >&2 <<EOF

  Use it:   export SLURM_CONF=$CONF      (or: source $ROOT/env.sh)
            sbatch --wrap 'srun hostname'; squeue; scontrol show job <id>
  PIDs:     $(for f in "$RUN"/*.pid; do case $f in *.self.pid) ;; *) printf '%s=%s ' "$(basename "$f" .pid)" "$(cat "$f")";; esac; done) (files $RUN/<daemon>.pid)
  Logs:     $LOG/   finished jobs: $LOG/jobcomp.log
  Stop:     SLURM_LOCAL_ROOT=$ROOT $(dirname "$(readlink -f "$0")")/stop.sh
EOF
