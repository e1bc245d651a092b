#!/usr/bin/env bash
# A real single-host Slurm cluster for the tests: slurmctld plus 4 simulated nodes n1..n4 (one
# slurmd -N nK each, all on this machine), the Torque-compatible PBS wrappers (qsub/qstat/qdel from
# slurm-wlm-torque) and both MPI launchers (mpiexec.openmpi, mpiexec.mpich). Runs as root on
# Debian 12 without systemd. Idempotent: `start` on a running cluster with the same configuration
# returns at once; with a different configuration it restarts the Slurm daemons.
#   scripts/test-cluster.sh start    install what is missing, start munged/slurmctld/slurmd n1..n4
#   scripts/test-cluster.sh stop     cancel all jobs, stop the Slurm daemons and munged
#   scripts/test-cluster.sh status   print sinfo/squeue; exit 0 when the cluster is up
#
# Nodes: n[1-4], CPUs=4 each (more than the real cores; SlurmdParameters=config_overrides), in the
# default partition `debug`. Jobs share nodes core by core (select/cons_tres, CR_Core), so several
# multi-node jobs run side by side: a job with one task per node takes one CPU on each of its nodes,
# which leaves room for a 4-node job next to two 2-node jobs. Nodes are told apart inside a job by
# SLURMD_NODENAME / SLURM_NODEID (`hostname` is the same everywhere).
set -euo pipefail

PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge slurm-wlm-torque openmpi-bin mpich)
NODES=(n1 n2 n3 n4)
CPUS_PER_NODE=4
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
STATEDIR=/var/spool/slurmctld
CTLD_PID=/run/slurmctld.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
READY_TIMEOUT=30

say() { echo "test-cluster: $*"; }
die() { echo "test-cluster: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# Print the tails of the logs that explain a failure.
show_logs() {
  local f
  for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-*.log /var/log/munge/munged.log; do
    [ -f "$f" ] || continue
    echo "----- tail of $f" >&2
    tail -n 15 "$f" >&2 || true
  done
}
fail() { echo "test-cluster: ERROR: $*" >&2; show_logs; exit 1; }

# True when the pid file names a live process whose command is $2.
pid_alive() {
  local file=$1 comm=$2 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}
slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  if pid_alive "$MUNGE_PID" munged && munge -n >/dev/null 2>&1; then
    return 0
  fi
  say "starting munged"
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s "$MUNGE_KEY" ]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$MUNGE_KEY"
    else
      dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none
    fi
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  # 9>&-: a daemon must not inherit the lock (munged would hold it for its whole life, and
  # the next `start` would wait for it forever).
  runuser -u munge -- /usr/sbin/munged 9>&- || fail "munged did not start"
  local i
  for i in $(seq 50); do
    munge -n >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "munged does not answer (munge -n)"
}

desired_conf() {
  local host
  host=$(hostname -s)
  cat <<EOF
# Written by scripts/test-cluster.sh: a single-host test cluster with simulated nodes.
ClusterName=fnxtest
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Backfill every second: once a job in the partition waits for resources, the main scheduler skips
# the jobs behind it and only backfill starts them (every 30 s by default).
SchedulerParameters=bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$STATEDIR
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
# Short timers for tests: SIGTERM->SIGKILL after 2 s, finished jobs stay visible for 5 min.
KillWait=2
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MessageTimeout=10
NodeName=n[1-4] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17004] CPUs=$CPUS_PER_NODE RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

# Stop slurmctld and the slurmd of every node (whatever their configuration), leaving munged.
stop_slurm() {
  local pids=() f pid i
  if pid_alive "$CTLD_PID" slurmctld; then
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  if pid_alive "$CTLD_PID" slurmctld; then pids+=("$(cat "$CTLD_PID")"); fi
  for f in /run/slurmd-*.pid; do
    if [ -e "$f" ] && pid_alive "$f" slurmd; then pids+=("$(cat "$f")"); fi
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for i in $(seq 100); do
    local alive=()
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    [ ${#alive[@]} -eq 0 ] && return 0
    pids=("${alive[@]}")
    sleep 0.1
  done
  say "killing ${pids[*]} (did not exit after SIGTERM)"
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

nodes_ready() {
  # All nodes registered and responding: idle, or busy with jobs (mix/alloc/completing).
  local out
  out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$out" | grep -cE '^n[1-4] (idle|mix|alloc|comp)$')" -eq ${#NODES[@]} ]
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) resumed=0
  while ! nodes_ready; do
    if [ $SECONDS -ge $deadline ]; then
      sinfo -N -p debug >&2 2>&1 || true
      fail "the nodes are not up after ${READY_TIMEOUT}s (logs: $LOGDIR/slurmctld.log, $LOGDIR/slurmd-nK.log)"
    fi
    # A responding node left down/drained by an earlier run: return it to service once.
    if [ $resumed -eq 0 ] && sinfo -h -N -p debug -o '%t' 2>/dev/null | grep -qE '^(down|drain|drng|fail)$'; then
      scontrol update NodeName="n[1-4]" State=RESUME >/dev/null 2>&1 || true
      resumed=1
    fi
    sleep 0.2
  done
}

start() {
  install_packages
  start_munge

  local want running=1 n out
  want=$(desired_conf)
  pid_alive "$CTLD_PID" slurmctld || running=0
  for n in "${NODES[@]}"; do pid_alive "$(slurmd_pidfile "$n")" slurmd || running=0; done

  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$want" ]; then
    if [ $running -eq 1 ] && nodes_ready; then
      say "cluster already up"
      return 0
    fi
  else
    if pid_alive "$CTLD_PID" slurmctld || compgen -G "/run/slurmd-*.pid" >/dev/null; then
      say "configuration changed: stopping the Slurm daemons"
      stop_slurm
    fi
    say "writing $CONF"
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$want" > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
  fi

  mkdir -p "$LOGDIR" "$STATEDIR"
  if ! pid_alive "$CTLD_PID" slurmctld; then
    say "starting slurmctld"
    out=$(/usr/sbin/slurmctld 2>&1 9>&-) || { echo "$out" >&2; fail "slurmctld did not start"; }
  fi
  for n in "${NODES[@]}"; do
    pid_alive "$(slurmd_pidfile "$n")" slurmd && continue
    say "starting slurmd -N $n"
    mkdir -p "/var/spool/slurmd-$n"
    out=$(/usr/sbin/slurmd -N "$n" 2>&1 9>&-) || { echo "$out" >&2; fail "slurmd -N $n did not start"; }
  done
  wait_ready
  say "cluster up: nodes ${NODES[*]} in partition debug"
}

stop() {
  if pid_alive "$CTLD_PID" slurmctld; then
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      local i
      for i in $(seq 50); do
        [ -z "$(squeue -h -t PD,R,CG,S -o '%i' 2>/dev/null)" ] && break
        sleep 0.1
      done
    fi
  fi
  say "stopping the Slurm daemons"
  stop_slurm
  if pid_alive "$MUNGE_PID" munged; then
    say "stopping munged"
    local pid i
    pid=$(cat "$MUNGE_PID")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  say "stopped"
}

status() {
  if ! command -v sinfo >/dev/null 2>&1; then
    say "Slurm is not installed"
    return 1
  fi
  local rc=0
  sinfo -N -p debug 2>&1 || rc=1
  squeue 2>&1 || rc=1
  pid_alive "$CTLD_PID" slurmctld && nodes_ready || rc=1
  if [ $rc -eq 0 ]; then say "up"; else say "down"; fi
  return $rc
}

# One start/stop at a time (parallel test runners may all call `start`).
lock() { exec 9>/run/fnx-test-cluster.lock; flock 9; }

case "${1:-}" in
  start) lock; start ;;
  stop) lock; stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
