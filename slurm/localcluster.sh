#!/usr/bin/env bash
# A real Slurm cluster on this machine, for chla's integration tests and for trying chla
# without a cluster: munged, MariaDB, slurmdbd, slurmctld and two slurmd "nodes" (node1,
# node2) on one host, all started by hand (no systemd needed). See slurm/README.md.
#
# Usage: slurm/localcluster.sh install|start|stop|status|reset   (as root; idempotent)
#
# Environment:
#   CHLA_SLURM_BASE     where all state, spool, database, logs and pidfiles live
#                       (default /var/tmp/chla-slurm)
#   CHLA_SLURM_DB_PORT  TCP port of the private MariaDB on 127.0.0.1 (default 6830)
#   CHLA_SLURM_TIMEOUT  seconds `start` waits for the cluster to answer (default 60)
#   CHLA_SLURM_CRED_EXPIRE  AuthInfo=cred_expire: a requeued job reruns after this + 1 s
#                       (default 10; 5 is the minimum)
#   CHLA_SLURM_GRACE_TIME   GraceTime of partition debug: seconds between the SIGTERM of a
#                       preemption and the SIGKILL (default 30)
set -euo pipefail

BASE="${CHLA_SLURM_BASE:-/var/tmp/chla-slurm}"
DB_PORT="${CHLA_SLURM_DB_PORT:-6830}"
START_TIMEOUT="${CHLA_SLURM_TIMEOUT:-60}"
CRED_EXPIRE="${CHLA_SLURM_CRED_EXPIRE:-10}"
GRACE_TIME="${CHLA_SLURM_GRACE_TIME:-30}"
CLUSTER=chla
CONF_DIR=/etc/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge # clients (libmunge in every Slurm command) look here
NODES=(node1 node2)
declare -A NODE_ADDR=([node1]=127.0.0.11 [node2]=127.0.0.12)
declare -A NODE_PORT=([node1]=6821 [node2]=6822)
PACKAGES=(munge slurmctld slurmd slurm-client slurm-wlm-basic-plugins slurmdbd mariadb-server)

STATE_DIR="$BASE/state"
SPOOL_DIR="$BASE/spool"
DB_DIR="$BASE/mysql"
RUN_DIR="$BASE/run"
LOG_DIR="$BASE/log"
DB_PASS_FILE="$BASE/slurmdbd.pass"
MYSQL_RUN="$RUN_DIR/mysqld"
MYSQL_SOCKET="$MYSQL_RUN/mysqld.sock"
MUNGE_RUN="$RUN_DIR/munge"
MUNGE_LOG="$LOG_DIR/munge"

# daemon name -> pidfile (and the process name that pidfile must point at)
declare -A PIDFILE=(
  [munged]="$MUNGE_RUN/munged.pid"
  [mariadbd]="$MYSQL_RUN/mysqld.pid"
  [slurmdbd]="$RUN_DIR/slurmdbd.pid"
  [slurmctld]="$RUN_DIR/slurmctld.pid"
  [slurmd-node1]="$RUN_DIR/slurmd-node1.pid"
  [slurmd-node2]="$RUN_DIR/slurmd-node2.pid"
)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2)

log() { printf 'localcluster: %s\n' "$*" >&2; }
die() { printf 'localcluster: error: %s\n' "$*" >&2; exit 1; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages, writes $CONF_DIR and starts daemons)"
}

# --- process bookkeeping ---------------------------------------------------------------

# The pid in a daemon's pidfile, printed only if that process is alive and really is the
# daemon (a stale pidfile whose pid was reused by something else must not be signalled).
daemon_pid() {
  local name=$1 file=${PIDFILE[$1]} pid comm
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] && pid_running "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "${name%%-node*}"* ]] || return 1 # slurmd-node1 -> slurmd (comm may be slurmd-wlm)
  echo "$pid"
}

is_up() { daemon_pid "$1" >/dev/null; }

# True while the process exists and is not a zombie waiting to be reaped.
pid_running() { [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) =~ ^[RSDT]$ ]]; }

wait_for() { # wait_for SECONDS COMMAND...: poll COMMAND until it succeeds
  local secs=$1 i
  shift
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  return 1
}

# SIGTERM the named daemons together (by pidfile, never by process name), then wait up to
# 15 s for them to exit. Returns 1 if any is still alive.
stop_daemons() {
  local name pid i rc=0
  declare -A pids=()
  for name in "$@"; do
    if pid=$(daemon_pid "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids[$name]=$pid
    else
      rm -f "${PIDFILE[$name]}"
    fi
  done
  for name in "$@"; do
    pid=${pids[$name]:-}
    [[ -n $pid ]] || continue
    for ((i = 0; i < 60; i++)); do
      pid_running "$pid" || break
      sleep 0.25
    done
    if pid_running "$pid"; then
      log "WARNING: $name (pid $pid) did not exit within 15 s after SIGTERM; left running"
      rc=1
    else
      log "stopped $name (pid $pid)"
      rm -f "${PIDFILE[$name]}"
    fi
  done
  return $rc
}

# --- install ---------------------------------------------------------------------------

missing_packages() {
  local p out=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p")
  done
  echo "${out[*]}"
}

cmd_install() {
  need_root
  local missing
  missing=$(missing_packages)
  if [[ -z $missing ]]; then
    log "packages already installed: ${PACKAGES[*]}"
    return 0
  fi
  log "installing: $missing"
  # Package postinst scripts try to start the daemons through invoke-rc.d; without systemd
  # that fails or, worse, starts them with Debian's config. A policy-rc.d answering 101
  # ("action forbidden") stops that; we start everything ourselves.
  local made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update &&
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${PACKAGES[@]}"
  } || rc=$?
  [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
  [[ $rc == 0 ]] || die "apt-get failed (exit $rc)"
  missing=$(missing_packages)
  [[ -z $missing ]] || die "still not installed after apt-get: $missing"
}

# --- configuration ---------------------------------------------------------------------

# Write $2 to $1 (mode $3) only when the content differs; return 0 if it changed.
write_if_changed() {
  local path=$1 content=$2 mode=$3
  if [[ -f $path ]] && [[ "$(cat "$path")" == "$content" ]]; then
    chmod "$mode" "$path"
    return 1
  fi
  local tmp
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s\n' "$content" >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
  return 0
}

node_cpus() { nproc; }
node_mem_mb() { # 40% of the machine's memory per node, so both nodes fit at once
  awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.40 }' /proc/meminfo
}

db_password() {
  if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
  fi
  cat "$DB_PASS_FILE"
}

HEADER="# Generated by chla slurm/localcluster.sh: rewritten on every start, do not edit by hand.
# State, logs and pidfiles live under $BASE."

slurm_conf() {
  local cpus mem host
  cpus=$(node_cpus)
  mem=$(node_mem_mb)
  host=$(hostname -s)
  cat <<EOF
$HEADER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held for cred_expire + 1 s before it reruns (default 120 s). 5 is the
# least Slurm accepts (requeue -> running again in ~6 s); 10 leaves slack on a loaded machine.
AuthInfo=cred_expire=$CRED_EXPIRE

StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups here (containers, gVisor): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30

# Cores AND memory are consumable, with a default per CPU: otherwise every job takes the
# whole node's memory and jobs run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Trust the node lines below over what slurmd detects (both "nodes" share one machine).
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true

# Schedule at once: a trivial job goes sbatch -> COMPLETED in about a second.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
MinJobAge=300
KillWait=5
InactiveLimit=0
MaxArraySize=1001

# Requeue (scontrol requeue, submitit checkpointing) and preemption as clusters do it: a job in
# partition "urgent" (higher PriorityTier) that needs the resources of jobs in "debug" preempts
# them; they get SIGTERM, SIGKILL GraceTime seconds later, and are requeued.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none

NodeName=node1 NodeHostname=localhost NodeAddr=${NODE_ADDR[node1]} Port=${NODE_PORT[node1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=${NODE_ADDR[node2]} Port=${NODE_PORT[node2]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=node1,node2 Default=NO MaxTime=INFINITE State=UP PriorityTier=2
EOF
}

slurmdbd_conf() {
  cat <<EOF
$HEADER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
EOF
}

cgroup_conf() {
  cat <<EOF
$HEADER
# Unused while slurm.conf names proctrack/linuxproc and task/none; kept so that a switch to
# the cgroup plugins does not try to reach systemd, which is absent here.
CgroupPlugin=autodetect
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=no
EOF
}

CONFIG_CHANGED=0
write_configs() {
  mkdir -p "$CONF_DIR"
  if write_if_changed "$CONF_DIR/slurm.conf" "$(slurm_conf)" 644; then CONFIG_CHANGED=1; fi
  if write_if_changed "$CONF_DIR/slurmdbd.conf" "$(slurmdbd_conf)" 600; then CONFIG_CHANGED=1; fi
  if write_if_changed "$CONF_DIR/cgroup.conf" "$(cgroup_conf)" 644; then CONFIG_CHANGED=1; fi
  chown root:root "$CONF_DIR/slurmdbd.conf"
}

ensure_hosts() {
  local n
  for n in "${NODES[@]}"; do
    if ! grep -Eq "^[[:space:]]*${NODE_ADDR[$n]//./\\.}[[:space:]]+(.*[[:space:]])?$n([[:space:]]|\$)" /etc/hosts; then
      # Append in place: /etc/hosts is often a bind mount that cannot be replaced by rename.
      printf '%s %s\n' "${NODE_ADDR[$n]}" "$n" >>/etc/hosts
      log "added '${NODE_ADDR[$n]} $n' to /etc/hosts"
    fi
  done
}

make_dirs() {
  mkdir -p "$BASE" "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
  chmod 755 "$BASE" "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
  local n
  for n in "${NODES[@]}"; do
    mkdir -p "$SPOOL_DIR/$n"
    chmod 755 "$SPOOL_DIR" "$SPOOL_DIR/$n"
  done
  # munged refuses directories writable by others and runs as user munge.
  mkdir -p "$MUNGE_SOCKET_DIR" "$MUNGE_RUN" "$MUNGE_LOG"
  chown munge:munge "$MUNGE_SOCKET_DIR" "$MUNGE_RUN" "$MUNGE_LOG"
  chmod 755 "$MUNGE_SOCKET_DIR" "$MUNGE_RUN"
  chmod 700 "$MUNGE_LOG"
  mkdir -p "$MYSQL_RUN"
  chown mysql:mysql "$MYSQL_RUN"
  chmod 755 "$MYSQL_RUN"
}

# --- daemons ---------------------------------------------------------------------------

munge_works() { munge -n -t 10 </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  if is_up munged; then return 0; fi
  if munge_works; then
    log "a munged not started by this script already answers on $MUNGE_SOCKET_DIR; using it"
    return 0
  fi
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    mkdir -p "$(dirname "$MUNGE_KEY")"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
  chmod 700 "$(dirname "$MUNGE_KEY")"
  chmod 400 "$MUNGE_KEY"
  runuser -u munge -- munged --key-file="$MUNGE_KEY" --pid-file="${PIDFILE[munged]}" \
    --log-file="$MUNGE_LOG/munged.log" </dev/null >/dev/null 2>&1 ||
    die "munged failed to start; see $MUNGE_LOG/munged.log"
  wait_for 10 munge_works || die "munged does not answer; see $MUNGE_LOG/munged.log"
  log "started munged (pid $(daemon_pid munged))"
}

mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot "$@"; }

start_mariadbd() {
  if ! is_up mariadbd; then
    if [[ ! -d $DB_DIR/mysql ]]; then
      log "initialising MariaDB data directory $DB_DIR"
      rm -rf "$DB_DIR"
      mkdir -p "$DB_DIR"
      chown mysql:mysql "$DB_DIR"
      mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
        --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve \
        >"$LOG_DIR/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed; see $LOG_DIR/mariadb-install.log"
    fi
    # mariadbd does not daemonise itself; setsid detaches it from our session.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
      --socket="$MYSQL_SOCKET" --pid-file="${PIDFILE[mariadbd]}" \
      --log-error="$LOG_DIR/mariadb.log" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --skip-name-resolve --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
      --innodb-lock-wait-timeout=900 </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    wait_for 30 mysql_root -e 'SELECT 1' ||
      die "MariaDB did not come up on $MYSQL_SOCKET; see $LOG_DIR/mariadb.log"
    log "started mariadbd (pid $(daemon_pid mariadbd || echo '?'))"
  fi
  local pass
  pass=$(db_password)
  mysql_root --batch <<EOF || die "could not create the slurm_acct_db database or its user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

slurmdbd_answers() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
  if ! is_up slurmdbd; then
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.log" 2>&1 || die "slurmdbd failed to start; see $LOG_DIR/slurmdbd.log"
    wait_for 30 slurmdbd_answers || die "slurmdbd does not answer; see $LOG_DIR/slurmdbd.log"
    log "started slurmdbd (pid $(daemon_pid slurmdbd || echo '?'))"
  fi
  if ! slurmdbd_answers 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr could not register cluster $CLUSTER"
    log "registered cluster $CLUSTER in accounting"
  fi
}

start_slurmctld() {
  if is_up slurmctld; then return 0; fi
  slurmctld </dev/null >>"$LOG_DIR/slurmctld.log" 2>&1 || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
  wait_for 20 scontrol ping || die "slurmctld does not answer; see $LOG_DIR/slurmctld.log"
  log "started slurmctld (pid $(daemon_pid slurmctld || echo '?'))"
}

start_slurmd() {
  local n=$1
  if is_up "slurmd-$n"; then return 0; fi
  mkdir -p "$SPOOL_DIR/$n"
  slurmd -N "$n" </dev/null >>"$LOG_DIR/slurmd-$n.log" 2>&1 || die "slurmd -N $n failed to start; see $LOG_DIR/slurmd-$n.log"
  wait_for 10 is_up "slurmd-$n" || die "slurmd -N $n did not stay up; see $LOG_DIR/slurmd-$n.log"
  log "started slurmd -N $n (pid $(daemon_pid "slurmd-$n"))"
}

# True when both nodes are usable: idle, or running jobs (when start is run on a live cluster).
nodes_ready() {
  local states
  states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE '^node[12] (idle|mix|alloc|comp)$' <<<"$states") -eq 2 ]]
}

resume_drained_nodes() {
  local n st
  for n in "${NODES[@]}"; do
    st=$(sinfo -h -N -n "$n" -p debug -o '%t' 2>/dev/null || true)
    if [[ $st == drain* || $st == drng* ]]; then
      log "node $n is $st: resuming it"
      scontrol update nodename="$n" state=resume || true
    fi
  done
}

sacct_answers() { sacct -n -X -S now-1minutes -o jobid; }

cmd_start() {
  need_root
  local t0=$SECONDS
  [[ -z $(missing_packages) ]] || cmd_install
  local already=1 d
  for d in "${DAEMONS[@]}"; do is_up "$d" || already=0; done

  make_dirs
  ensure_hosts
  write_configs
  if [[ $already == 1 && $CONFIG_CHANGED == 1 ]]; then
    log "WARNING: configuration changed while the cluster runs; 'stop' then 'start' to apply it"
  fi

  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld
  local n
  for n in "${NODES[@]}"; do start_slurmd "$n"; done

  if ! wait_for "$START_TIMEOUT" ready_or_resume; then
    sinfo -N -p debug >&2 || true
    die "nodes not idle after ${START_TIMEOUT} s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-node*.log"
  fi
  wait_for "$START_TIMEOUT" sacct_answers || die "sacct does not answer; see $LOG_DIR/slurmdbd.log"
  local verb=started
  [[ $already == 1 ]] && verb="already running"
  echo "chla local Slurm cluster $verb in $((SECONDS - t0)) s: cluster $CLUSTER, partition debug" \
    "(default, GraceTime ${GRACE_TIME} s) + urgent (preempts debug), nodes node1,node2 with $(node_cpus) CPUs and $(node_mem_mb) MB each," \
    "accounting on; state in $BASE"
}

ready_or_resume() {
  nodes_ready && return 0
  resume_drained_nodes >/dev/null 2>&1
  return 1
}

cmd_stop() {
  need_root
  local failed=0
  # Order matters: slurmctld flushes job records to slurmdbd, which writes them to MariaDB.
  stop_daemons slurmd-node1 slurmd-node2 || failed=1
  stop_daemons slurmctld || failed=1
  stop_daemons slurmdbd || failed=1
  stop_daemons mariadbd munged || failed=1
  [[ $failed == 0 ]] || die "some daemons did not stop; see the warnings above"
  log "all daemons stopped"
}

cmd_status() {
  local d pid all=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(daemon_pid "$d"); then
      printf '%-13s up    pid %s\n' "$d" "$pid"
    elif [[ $d == munged ]] && munge_works; then
      printf '%-13s up    (not started by this script)\n' "$d"
    else
      printf '%-13s down\n' "$d"
      all=1
    fi
  done
  if command -v sinfo >/dev/null; then
    echo
    sinfo -N -l 2>&1 || all=1
  fi
  return $all
}

cmd_reset() {
  need_root
  cmd_stop
  case "$BASE" in
    "" | / | /var | /var/tmp | /tmp | /root | /home) die "refusing to wipe CHLA_SLURM_BASE=$BASE" ;;
  esac
  log "wiping job state, spool, database and logs under $BASE"
  rm -rf "$STATE_DIR" "$SPOOL_DIR" "$DB_DIR" "$RUN_DIR" "$LOG_DIR" "$DB_PASS_FILE"
  cmd_start
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
