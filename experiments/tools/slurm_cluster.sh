#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests (make slurm-up / make slurm-down).
#
#   bash experiments/tools/slurm_cluster.sh up     # root: install Debian's slurm + munge if missing, start, wait idle
#   bash experiments/tools/slurm_cluster.sh down   # stop the daemons by their pidfiles
#
# Idempotent. No systemd: munged, slurmctld and slurmd are started by hand. slurm.conf (under
# $SLURM_LOCAL, default /run/slurm-local) has this host's cores and memory, proctrack/linuxproc,
# task/none, JobRequeue=1, cred_expire=5 (a requeued job may start again after 5 s, not 121 s), a
# scheduling pass every 2 s (a requeued job waits for one: 60 s by default),
# a default partition `debug` whose jobs a higher-priority partition `urgent` preempts by requeue
# after a GraceTime of $SLURM_GRACE_S (default 20) s, and partition `nograce` (GraceTime=0).
# Accounting (sacct, which submitit asks about a job that ended without a result; without it submitit
# waits forever on such a job): slurmdbd over Debian's MariaDB, both started by hand too.
set -euo pipefail

STATE=${SLURM_LOCAL:-/run/slurm-local}
CONF=$STATE/slurm.conf
GRACE=${SLURM_GRACE_S:-20}
export SLURM_CONF=$CONF

stop_pidfile() {
    local file=$1
    [ -f "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/slurmdbd.pid"
    stop_pidfile "$STATE/mariadbd.pid"
    stop_pidfile "$STATE/munged.pid"
    echo "slurm-local: stopped"
}

# MariaDB (socket only) + slurmdbd (slurmdbd.conf beside slurm.conf), the cluster registered
start_accounting() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    rm -f /run/mysqld/mysqld.sock
    setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --skip-networking --log-error=/run/mysqld/mysqld.err \
        </dev/null >/dev/null 2>&1 &
    local i
    for i in $(seq 300); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.1; done
    if ! mariadb -e "select 1" >/dev/null 2>&1; then
        echo "slurm-local: MariaDB did not start" >&2
        tail -n 20 /run/mysqld/mysqld.err >&2 || true
        exit 1
    fi
    cp /run/mysqld/mysqld.pid "$STATE/mariadbd.pid"
    mariadb -e "create database if not exists slurm_acct_db; create user if not exists 'slurm'@'localhost' \
        identified by 'slurm'; grant all on slurm_acct_db.* to 'slurm'@'localhost';"
    cat >"$STATE/slurmdbd.conf" <<DBD
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
DBD
    chmod 600 "$STATE/slurmdbd.conf"
    slurmdbd
    for i in $(seq 300); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
    sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
}

up() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-local: must run as root (it installs packages and starts daemons)" >&2
        exit 2
    fi
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null \
        && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "slurm-local: already up ($CONF)"
        return 0
    fi
    down >/dev/null
    local t0
    t0=$(date +%s%N)
    local packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
    local commands=(slurmctld slurmd munged sbatch slurmdbd mariadbd) missing=0 c
    for c in "${commands[@]}"; do command -v "$c" >/dev/null || missing=1; done
    if [ $missing = 1 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                "${packages[@]}" >/dev/null; }
    fi
    local installed t1
    t1=$(date +%s%N)
    installed=$(awk "BEGIN {printf \"%.1f\", ($t1 - $t0) / 1e9}")
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
    cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=nograce Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=0
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    # the client commands (sbatch, sinfo, scontrol, ...) read /etc/slurm/slurm.conf unless SLURM_CONF is set
    mkdir -p /etc/slurm
    if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
    local munge_user=munge
    id munge >/dev/null 2>&1 || munge_user=root
    su -s /bin/sh "$munge_user" -c "munged --pid-file=/run/munge/munged.pid --force" 2>/dev/null \
        || munged --pid-file=/run/munge/munged.pid --force
    cp /run/munge/munged.pid "$STATE/munged.pid"
    start_accounting
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 150); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; then
            echo "slurm-local: up in $(awk "BEGIN {printf \"%.1f\", ($(date +%s%N) - $t0) / 1e9}") s" \
                "(package install ${installed} s); SLURM_CONF=$CONF; accounting slurmdbd;" \
                "node $host: $cpus CPUs, $mem MB; partitions debug (default, GraceTime=$GRACE), nograce, urgent"
            return 0
        fi
        sleep 0.2
    done
    echo "slurm-local: the node did not become idle in 30 s; logs in $STATE/log" >&2
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
}

case "${1:-}" in
up) up ;;
down) down ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
