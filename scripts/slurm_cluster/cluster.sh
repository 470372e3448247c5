#!/usr/bin/env bash
# Real SLURM cluster (Debian 12 / SLURM 22.05) for the tests of finellama_rl:
# munged + MariaDB + slurmdbd + slurmctld + one slurmd per node, all started by
# hand (no systemd), all config and state under one directory. One node by
# default; `--nodes N` runs N slurmd daemons on this one machine as N nodes.
#
# Usage (as root):
#   scripts/slurm_cluster/cluster.sh start    # install packages if missing, bring the cluster up
#   scripts/slurm_cluster/cluster.sh start --nodes 2  # two nodes on this machine (also FINELLAMA_SLURM_NODES=2)
#   scripts/slurm_cluster/cluster.sh start --fresh  # stop it, wipe the state dir, start from nothing
#   scripts/slurm_cluster/cluster.sh status   # sinfo + daemon liveness; exit 0 iff healthy
#   scripts/slurm_cluster/cluster.sh stop     # stop the daemons this script started (state is kept)
#   eval "$(scripts/slurm_cluster/cluster.sh env)"   # SLURM_CONF etc. for sbatch/sacct/submitit
#
# Environment:
#   FINELLAMA_SLURM_DIR        state dir (default /tmp/finellama-slurm): config, logs,
#                              database, spool, pid files, munge key, DB password. Created
#                              0700; refused when another user owns it (or it is a
#                              symlink): a planted key or pid file must never be trusted.
#                              So only its owner (root) can use this test cluster.
#   FINELLAMA_SLURM_PORT_BASE  first of 4 TCP ports on 127.0.0.1 (default 16817):
#                              slurmctld, slurmd, slurmdbd, mariadbd; with N > 1 nodes,
#                              nodes 2..N use base+4 .. base+N+2. They differ from
#                              SLURM's defaults so a system SLURM can stay as it is.
#   FINELLAMA_SLURM_NODES      node count for `start` when --nodes is not given (default 1).
#   FINELLAMA_SLURM_TIMEOUT    seconds to wait for each daemon / the node (default 60).
#
# The cluster: one node named `hostname -s` (NodeAddr 127.0.0.1), partitions
# `debug` (default) and `cpu`, MaxTime=INFINITE, accounting through slurmdbd
# (so sacct works, which submitit polls), cgroup v1 memory enforcement (a job
# over --mem ends OUT_OF_MEMORY), JobRequeue=1 (scontrol requeue works).
#
# With --nodes N (N = 2..4): nodes `<host>-1` .. `<host>-N` (NodeHostname `hostname -s`,
# NodeAddr 127.0.0.1, one Port each), one `slurmd -N <node>` each with its own spool
# folder, pid and log file (%n in slurm.conf). Debian's SLURM is built with
# MULTIPLE_SLURMD, so each slurmd puts its jobs' cgroups under its own root
# (/sys/fs/cgroup/<controller>/slurm_<node>): --mem is enforced per node. Every node
# declares all of the machine's CPUs (they share them) and 95%/N of its memory. The
# node names do not resolve (no /etc/hosts entry): a job that needs the first node's
# address asks `scontrol show node` for its NodeAddr, or uses SLURM_LAUNCH_NODE_IPADDR.
# `start` with another node count than the running cluster restarts slurmctld and the
# slurmd daemons (munged, MariaDB and slurmdbd keep running; a job running then is
# requeued, and one that needs more nodes than now exist stays PENDING: scancel it);
# status and stop act on the node count the cluster was last started with
# ($FINELLAMA_SLURM_DIR/etc/nodes).
# A daemon this script did not start (pid files under $FINELLAMA_SLURM_DIR/pids,
# checked against the process's start time and command) is never signalled; a
# foreign slurmd for one of this cluster's node names makes `start` refuse (two
# slurmds for one node would fight over the same cgroups). A slurmd of another
# cluster with other node names (e.g. a private 2-node cluster, nodes <host>-1,2,
# next to the shared 1-node one, with its own FINELLAMA_SLURM_DIR and
# FINELLAMA_SLURM_PORT_BASE) has its own cgroup root and is left alone. Every daemon listens on 127.0.0.1 only; the munge key and
# the database password (generated, never a constant) are created under umask 077.
set -euo pipefail

PROG="slurm-cluster"
DIR_GIVEN="${FINELLAMA_SLURM_DIR:-/tmp/finellama-slurm}"
DIR="$(realpath -m "$DIR_GIVEN")"
PORT_BASE="${FINELLAMA_SLURM_PORT_BASE:-16817}"
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
WAIT_S="${FINELLAMA_SLURM_TIMEOUT:-60}"

ETC="$DIR/etc"
LOG="$DIR/log"
RUN="$DIR/run"
PIDS="$DIR/pids"
SPOOL="$DIR/spool"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket"
MUNGE_KEY="$MUNGE_DIR/munge.key"
DB_DATA="$DIR/mysql"
DB_SOCK="$RUN/mysqld.sock"
DB_USER="slurm"
DB_PASS_FILE="$ETC/db.pass"
CLUSTER_NAME="finellama"

# DAEMONS (munged mariadbd slurmdbd slurmctld + one slurmd per node), NODES, NODE_NAMES
# and SLURMDS (the slurmds' pid-file names) are set by set_nodes once the node count is known.
BASE_DAEMONS=(munged mariadbd slurmdbd slurmctld)
MAX_NODES=4
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server-core mariadb-client-core)

export SLURM_CONF="$ETC/slurm.conf"

T0=$EPOCHREALTIME

log() { echo "[$PROG] $*"; }
err() { echo "[$PROG] ERROR: $*" >&2; }
# seconds since the script started, e.g. "3.41s"
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }

# ---------------------------------------------------------------- processes --

# "STATE STARTTIME" of a pid, from /proc/PID/stat (fields 3 and 22).
pid_stat() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "$1 ${20}"
}

# The program a pid runs (basename of argv[0]).
pid_command() {
    local argv0
    argv0=$(tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | head -n 1) || return 1
    [[ -n $argv0 ]] || return 1
    basename -- "$argv0"
}

# The program of a daemon name: `slurmd.<node>` (one of several slurmds) runs slurmd.
program_of() { echo "${1%%.*}"; }

# The pid recorded for daemon $1, if that very process (same start time, and it
# runs the daemon's program) is still alive and not a zombie. A pid file that
# names any other process is ignored: it is never signalled.
recorded_pid() {
    local f="$PIDS/$1" pid start info state now
    [[ -r $f && ! -L $f ]] || return 1
    read -r pid start <"$f" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    info=$(pid_stat "$pid") || return 1
    read -r state now <<<"$info"
    [[ $state != Z && $state != X && $now == "$start" ]] || return 1
    [[ $(pid_command "$pid") == "$(program_of "$1")" ]] || return 1
    echo "$pid"
}

alive() { recorded_pid "$1" >/dev/null; }

# launch NAME CMD...: run CMD in the foreground of a new session, in the
# background of this script, output to $LOG/NAME.out; record its pid.
launch() {
    local name=$1 pid info program
    program=$(program_of "$1")
    shift
    setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null 9>&- &
    pid=$!
    info=$(pid_stat "$pid") || { err "$name exited at once"; tail_logs "$name"; exit 1; }
    local i
    for ((i = 0; i < 100; i++)); do # until setsid has exec-ed the daemon (recorded_pid checks the command)
        [[ $(pid_command "$pid" || true) == "$program" ]] && break
        sleep 0.02
    done
    echo "$pid ${info#* }" >"$PIDS/$name"
}

daemon_logs() {
    case $1 in
        munged) echo "$LOG/munged.log $LOG/munged.out" ;;
        mariadbd) echo "$LOG/mariadbd.log $LOG/mariadbd.out $LOG/mariadb-install-db.out" ;;
        slurmdbd) echo "$LOG/slurmdbd.log $LOG/slurmdbd.out" ;;
        slurmctld) echo "$LOG/slurmctld.log $LOG/slurmctld.out" ;;
        slurmd) echo "$LOG/slurmd.log $LOG/slurmd.out" ;;
        slurmd.*) echo "$LOG/slurmd-${1#slurmd.}.log $LOG/$1.out" ;;
    esac
}

tail_logs() {
    local f
    for f in $(daemon_logs "$1"); do
        [[ -s $f ]] || continue
        echo "----- tail -n 25 $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# wait_for NAME DESCRIPTION CHECK...: poll CHECK until it succeeds; fail with
# the daemon's log tail if the daemon dies or WAIT_S passes.
wait_for() {
    local name=$1 what=$2 t=$EPOCHREALTIME deadline=$((SECONDS + WAIT_S))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! alive "$name"; then
            err "$name exited while waiting for $what"
            tail_logs "$name"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            err "$what: no answer within ${WAIT_S}s"
            tail_logs "$name"
            exit 1
        fi
        sleep 0.2
    done
    log "$what ok ($(since "$t"))"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ------------------------------------------------------------------- checks --

munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null; }
db_ok() { mariadb --no-defaults --socket="$DB_SOCK" -uroot -N -e "SELECT 1"; }
dbd_ok() { port_open "$DBD_PORT" && timeout 10 sacctmgr -n -P list cluster; }
ctld_ok() { [[ $(timeout 10 scontrol ping) == *'is UP'* ]]; }
sacct_ok() {
    local out
    out=$(timeout 10 sacct -n -X -S now -o JobID 2>&1) || return 1
    [[ $out != *rror* ]]
}
node_state() { timeout 10 sinfo -h -N -n "$1" -p debug -o %t 2>/dev/null | head -n 1; }
node_ok() {
    case "$(node_state "$1")" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}
nodes_ok() {
    local n
    for n in "${NODE_NAMES[@]}"; do node_ok "$n" || return 1; done
}

healthy() {
    local d
    for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
    nodes_ok && sacct_ok
}

# ----------------------------------------------------------------- install --

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == 'install ok installed' ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        err "packages missing (${missing[*]}) and not root: install them or run as root"
        exit 1
    fi
    local t=$EPOCHREALTIME added_policy=0
    log "installing ${missing[*]} ..."
    # Never let the packages' init scripts start a system munge/slurm.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt_log="/tmp/finellama-slurm-apt.$$.log"
    local need_update=0
    for p in "${missing[@]}"; do
        [[ $(apt-cache policy "$p" 2>/dev/null) =~ Candidate:\ [0-9] ]] || need_update=1
    done
    local rc=0
    if ((need_update == 0)); then
        apt-get install -y --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1 || rc=$?
    fi
    if ((need_update == 1 || rc != 0)); then
        log "running apt-get update ..."
        rc=0
        { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } >>"$apt_log" 2>&1 || rc=$?
    fi
    ((added_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        err "apt-get failed (rc=$rc)"
        tail -n 30 "$apt_log" >&2
        exit 1
    fi
    rm -f "$apt_log"
    log "packages installed ($(since "$t"))"
}

# ------------------------------------------------------------------- config --

# write_file PATH MODE: stdin -> PATH, only if the content changed.
write_file() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        chmod "$mode" "$path"
    else
        mv -f "$tmp" "$path"
    fi
}

write_config() {
    mkdir -p "$ETC" "$LOG" "$RUN" "$PIDS" "$SPOOL/ctld" "$MUNGE_DIR" "$DIR/tmp"
    chmod 700 "$DIR"
    chmod 755 "$ETC" "$LOG" "$RUN" "$PIDS" "$SPOOL"
    chmod 700 "$MUNGE_DIR"
    chmod 1777 "$DIR/tmp"

    # Secrets are created unreadable to others from the first byte (umask 077), never chmod-ed afterwards.
    if [[ ! -s $MUNGE_KEY ]]; then
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    if [[ ! -s $DB_PASS_FILE ]]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DB_PASS_FILE")
    fi
    local secret
    for secret in "$MUNGE_KEY" "$DB_PASS_FILE"; do
        if [[ -L $secret || $(stat -c %u "$secret") != "$EUID" ]]; then
            err "$secret is a symlink or not owned by uid $EUID; refusing to use it (remove $DIR and start again)"
            exit 1
        fi
        chmod 600 "$secret"
    done
    DB_PASS=$(cat "$DB_PASS_FILE")

    # Hardware as slurmd sees it (cached: slurmd -C costs ~1 s).
    if [[ ! -s $ETC/node.detected ]]; then
        SLURM_CONF=/dev/null slurmd -C 2>/dev/null | head -n 1 >"$ETC/node.detected.tmp"
        mv "$ETC/node.detected.tmp" "$ETC/node.detected"
    fi
    local hw mem key
    hw=$(cat "$ETC/node.detected")
    declare -A HW=()
    for key in $hw; do HW[${key%%=*}]=${key#*=}; done
    mem=$((${HW[RealMemory]:-1024} * 95 / 100 / NODES))
    # One node: `hostname -s`, the paths of old. Several: %n (the node name) in every per-slurmd path.
    local sfx="" node_lines="" nodes_csv n i
    ((NODES == 1)) || sfx="-%n"
    ((NODES == 1)) && mkdir -p "$SPOOL/slurmd"
    for ((i = 0; i < NODES; i++)); do
        n=${NODE_NAMES[i]}
        ((NODES == 1)) || mkdir -p "$SPOOL/slurmd-$n"
        node_lines+="NodeName=$n"
        ((NODES == 1)) || node_lines+=" NodeHostname=$NODE"
        node_lines+=" NodeAddr=127.0.0.1"
        ((NODES == 1)) || node_lines+=" Port=$(node_port "$i")"
        node_lines+=" CPUs=${HW[CPUs]:-1} Boards=${HW[Boards]:-1} SocketsPerBoard=${HW[SocketsPerBoard]:-1} CoresPerSocket=${HW[CoresPerSocket]:-1} ThreadsPerCore=${HW[ThreadsPerCore]:-1} RealMemory=$mem State=UNKNOWN"$'\n'
    done
    nodes_csv=$(IFS=,; echo "${NODE_NAMES[*]}")

    write_file "$ETC/slurm.conf" 644 <<EOF
# Generated by scripts/slurm_cluster/cluster.sh -- edits are overwritten.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/slurmd$sfx
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd$sfx.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd$sfx.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# Bind to the configured addresses (127.0.0.1), not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
JobRequeue=1
ReturnToService=2
# SLURM's default: a requeued or preempted run needs the time to finish its step and save
KillWait=30
InactiveLimit=0
MinJobAge=300
${node_lines}PartitionName=debug Nodes=$nodes_csv Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$nodes_csv Default=NO MaxTime=INFINITE State=UP
EOF

    write_file "$ETC/cgroup.conf" 644 <<EOF
# Generated by scripts/slurm_cluster/cluster.sh -- edits are overwritten.
CgroupPlugin=cgroup/v1
CgroupAutomount=yes
ConstrainCores=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
EOF

    write_file "$ETC/slurmdbd.conf" 600 <<EOF
# Generated by scripts/slurm_cluster/cluster.sh -- edits are overwritten.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

# ------------------------------------------------------------------ daemons --

start_munged() {
    launch munged munged -F --force \
        --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" --num-threads=4
}

start_mariadbd() {
    if [[ ! -d $DB_DATA/mysql ]]; then
        local t=$EPOCHREALTIME
        log "initialising MariaDB in $DB_DATA ..."
        rm -rf "$DB_DATA"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install-db.out" 2>&1 || {
            err "mariadb-install-db failed"
            tail -n 30 "$LOG/mariadb-install-db.out" >&2
            exit 1
        }
        log "MariaDB initialised ($(since "$t"))"
    fi
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$DB_DATA" \
        --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$RUN/mysqld.pid" \
        --log-error="$LOG/mariadbd.log" --tmpdir="$DIR/tmp" \
        --innodb-buffer-pool-size=1024M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900
}

# slurmdbd's database account (idempotent; mariadbd must answer).
ensure_db_user() {
    mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "
        CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';" >>"$LOG/mariadbd.out" 2>&1 || {
        err "could not create the slurm database user"
        tail_logs mariadbd
        exit 1
    }
}

start_slurmdbd() {
    launch slurmdbd slurmdbd -D
}

start_slurmctld() {
    launch slurmctld slurmctld -D -f "$SLURM_CONF"
}

# start_slurmd [PIDNAME NODE]: the one slurmd (`hostname -s`), or the slurmd of one of several nodes.
start_slurmd() {
    launch "${1:-slurmd}" slurmd -D -f "$SLURM_CONF" -N "${2:-$NODE}"
}

# Every node idle (resuming one that an old run left down/drained), then sacct.
wait_node_and_sacct() {
    local t=$EPOCHREALTIME deadline=$((SECONDS + WAIT_S)) state next_resume=$((SECONDS + 2)) d n i
    while ! nodes_ok; do
        for d in "${SLURMDS[@]}"; do
            alive "$d" || { err "$d exited"; tail_logs "$d"; exit 1; }
        done
        alive slurmctld || { err "slurmctld exited"; tail_logs slurmctld; exit 1; }
        for ((i = 0; i < NODES; i++)); do
            n=${NODE_NAMES[i]}
            state=$(node_state "$n" || true)
            if [[ $state =~ ^(down|drain|drng|fail|failg)$ ]] && ((SECONDS >= next_resume)); then
                log "node $n is '$state' ($(timeout 5 sinfo -h -R -n "$n" -o %E 2>/dev/null | head -n 1)); resuming it"
                timeout 10 scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
            fi
            if ((SECONDS >= deadline)) && ! node_ok "$n"; then
                err "node $n not idle within ${WAIT_S}s (state: '${state:-?}')"
                timeout 5 sinfo -N -l >&2 || true
                tail_logs "${SLURMDS[i]}"
                tail_logs slurmctld
                exit 1
            fi
        done
        ((SECONDS >= next_resume)) && next_resume=$((SECONDS + 5))
        sleep 0.2
    done
    for n in "${NODE_NAMES[@]}"; do log "node $n is $(node_state "$n") ($(since "$t"))"; done
    wait_for slurmdbd "sacct" sacct_ok
}

# Foreign SLURM daemons: leave them alone; refuse if a foreign slurmd runs.
# foreign_slurmd_node PID: the node a slurmd serves (its -N argument, else `hostname -s`).
foreign_slurmd_node() {
    local -a args
    mapfile -d '' -t args <"/proc/$1/cmdline" 2>/dev/null || true
    local i
    for ((i = 0; i < ${#args[@]}; i++)); do
        [[ ${args[i]} == -N ]] && { echo "${args[i + 1]:-}"; return; }
    done
    echo "$NODE"
}

check_foreign() {
    local d pid ours f node
    for d in slurmctld slurmd slurmdbd; do
        ours=" $(recorded_pid "$d" || true) "
        if [[ $d == slurmd ]]; then # every slurmd this script started, whatever the node count then
            for f in "$PIDS"/slurmd.*; do
                [[ -e $f ]] && ours+="$(recorded_pid "${f##*/}" || true) "
            done
        fi
        for pid in $(pgrep -x "$d" || true); do
            [[ $ours == *" $pid "* ]] && continue
            [[ $(pid_stat "$pid" || echo Z) == Z* ]] && continue # zombie: PID 1 may not reap
            if [[ $d == slurmd ]]; then
                node=$(foreign_slurmd_node "$pid")
                if [[ " ${NODE_NAMES[*]} " != *" $node "* ]]; then # another cluster's node: its own cgroup root
                    log "note: a slurmd of another cluster is running (pid $pid, node $node); leaving it alone"
                    continue
                fi
                err "a slurmd not started from $DIR is running for node $node (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))."
                err "Refusing to start a second slurmd for that node on this host; it is left untouched."
                exit 1
            fi
            log "note: a $d not started by this script is running (pid $pid); leaving it alone"
        done
    done
    local name port i
    local ports=(slurmctld:$CTLD_PORT slurmdbd:$DBD_PORT mariadbd:$DB_PORT)
    for ((i = 0; i < NODES; i++)); do ports+=("${SLURMDS[i]}:$(node_port "$i")"); done
    for name in "${ports[@]}"; do
        port=${name#*:}
        name=${name%%:*}
        if ! alive "$name" && port_open "$port"; then
            err "port $port (for $name) is already in use by another process; set FINELLAMA_SLURM_PORT_BASE"
            exit 1
        fi
    done
}

# ------------------------------------------------------------- subcommands --

# stop_daemons NAME...: stop each daemon this script started (by its pid file), in order.
stop_daemons() {
    local d pid t any=0
    for d in "$@"; do
        if pid=$(recorded_pid "$d"); then
            any=1
            t=$EPOCHREALTIME
            log "stopping $d (pid $pid) ..."
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while alive "$d"; do
                if ((SECONDS >= deadline)); then
                    log "$d did not exit after 30s; sending SIGKILL"
                    kill -KILL "$pid" 2>/dev/null || true
                    deadline=$((SECONDS + 10))
                fi
                sleep 0.1
            done
            log "$d stopped ($(since "$t"))"
        fi
        rm -f "$PIDS/$d"
    done
    ((any))
}

# The slurmd pid-file names present (one node: slurmd; several: slurmd.<node>).
slurmd_pid_files() {
    local f
    [[ -e $PIDS/slurmd ]] && echo slurmd
    for f in "$PIDS"/slurmd.*; do
        [[ -e $f ]] && echo "${f##*/}"
    done
    return 0
}

cmd_stop() {
    local slurmds
    mapfile -t slurmds < <(slurmd_pid_files)
    stop_daemons "${slurmds[@]}" slurmctld slurmdbd mariadbd munged || log "nothing to stop in $DIR"
    log "stopped ($(elapsed))"
}

cmd_start() {
    local fresh=0 nodes=${FINELLAMA_SLURM_NODES:-1}
    while (($#)); do
        case $1 in
            --fresh) fresh=1 ;;
            --nodes) (($# >= 2)) || { err "--nodes needs a number"; exit 2; }; nodes=$2; shift ;;
            --nodes=*) nodes=${1#--nodes=} ;;
            *) err "unknown option for start: $1"; exit 2 ;;
        esac
        shift
    done
    if [[ ! $nodes =~ ^[1-9][0-9]*$ ]] || ((nodes > MAX_NODES)); then
        err "node count must be 1..$MAX_NODES (got '$nodes')"
        exit 2
    fi
    if ((fresh)); then
        [[ -d $PIDS ]] && cmd_stop
        case $DIR in /) err "refusing to wipe /"; exit 1 ;; esac
        log "wiping $DIR"
        find "$DIR" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
    fi
    local before
    before=$(configured_nodes)
    set_nodes "$nodes"
    if ((before == NODES)) && [[ -f $SLURM_CONF ]] && command -v sinfo >/dev/null && healthy; then
        log "cluster in $DIR is already up and healthy ($NODES node(s))"
        exit 0
    fi
    local switched=0
    if ((before != NODES)); then # the node list changes: slurmctld and every slurmd start again
        local slurmds
        mapfile -t slurmds < <(slurmd_pid_files)
        if stop_daemons "${slurmds[@]}" slurmctld; then
            log "switched from $before to $NODES node(s): slurmctld and slurmd restart"
            switched=1
        fi
    fi
    log "starting the cluster in $DIR ($NODES node(s))"
    install_packages
    check_foreign
    write_config
    echo "$NODES" >"$ETC/nodes"
    local d
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            log "$d already running (pid $(recorded_pid "$d"))"
        else
            log "starting $d ..."
            case $d in
                slurmd.*) start_slurmd "$d" "${d#slurmd.}" ;;
                *) "start_$d" ;;
            esac
        fi
        # Each daemon must answer before the next one starts.
        case $d in
            munged) wait_for munged "munged" munge_ok ;;
            mariadbd)
                wait_for mariadbd "mariadbd (127.0.0.1:$DB_PORT)" db_ok
                ensure_db_user
                ;;
            slurmdbd) wait_for slurmdbd "slurmdbd (127.0.0.1:$DBD_PORT)" dbd_ok ;;
            slurmctld) wait_for slurmctld "slurmctld (127.0.0.1:$CTLD_PORT)" ctld_ok ;;
        esac
    done
    wait_node_and_sacct
    if ((switched)); then # jobs that ran on the old nodes were requeued; one that needs more nodes waits forever
        local queued
        queued=$(timeout 10 squeue -h -t PD,R,CG -o %i 2>/dev/null | wc -l || true)
        ((queued == 0)) || log "note: $queued job(s) from before the switch are still queued (squeue); scancel those that need the old nodes"
    fi
    log "cluster up, $NODES node(s): ${NODE_NAMES[*]} ($(elapsed)); use: eval \"\$($0 env)\""
}

cmd_status() {
    local d pid ok=0
    set_nodes "$(configured_nodes)"
    echo "nodes: $NODES (${NODE_NAMES[*]})"
    if [[ -f $SLURM_CONF ]] && command -v sinfo >/dev/null; then
        timeout 10 sinfo || ok=1
    else
        echo "no cluster config at $SLURM_CONF"
        ok=1
    fi
    for d in "${DAEMONS[@]}"; do
        if pid=$(recorded_pid "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    if ((ok == 0)) && healthy; then
        echo "healthy ($DIR)"
        return 0
    fi
    echo "NOT healthy ($DIR)"
    return 1
}

cmd_env() {
    if [[ ! -f $SLURM_CONF ]]; then
        err "no cluster config at $SLURM_CONF; run '$0 start' first"
        exit 1
    fi
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
    printf 'export FINELLAMA_SLURM_DIR=%q\n' "$DIR"
}

# The state dir: created 0700 by us; one that is a symlink or owned by another
# user is refused (its munge key, pid files or config could have been planted).
check_state_dir() {
    if [[ -L ${DIR_GIVEN%/} || -L $DIR ]]; then
        err "$DIR is a symlink; refusing to use it (set FINELLAMA_SLURM_DIR to a folder of your own)"
        exit 1
    fi
    if [[ ! -e $DIR ]]; then
        mkdir -p "$(dirname "$DIR")"
        mkdir -m 700 "$DIR"
    fi
    if [[ ! -d $DIR || $(stat -c %u "$DIR") != "$EUID" ]]; then
        err "$DIR is not a folder owned by uid $EUID (owner: $(stat -c %U "$DIR" 2>/dev/null)); refusing to use it"
        exit 1
    fi
    chmod 700 "$DIR"
}

# One start/stop at a time per state dir (e.g. parallel pytest workers).
# fd 9 is closed in the daemons (see launch) so they never hold the lock.
lock() {
    check_state_dir
    exec 9>"$DIR/.lock"
    if ! flock -n 9; then
        log "waiting for another cluster.sh on $DIR ..."
        flock -w 900 9 || { err "timed out waiting for $DIR/.lock"; exit 1; }
    fi
}

# set_nodes N: NODES, NODE_NAMES, SLURMDS (pid-file names), DAEMONS for an N-node cluster.
set_nodes() {
    local i
    NODES=$1
    NODE_NAMES=()
    SLURMDS=()
    if ((NODES == 1)); then
        NODE_NAMES=("$NODE")
        SLURMDS=(slurmd)
    else
        for ((i = 1; i <= NODES; i++)); do
            NODE_NAMES+=("$NODE-$i")
            SLURMDS+=("slurmd.$NODE-$i")
        done
    fi
    DAEMONS=("${BASE_DAEMONS[@]}" "${SLURMDS[@]}")
}

# The node count the cluster in $DIR was last configured with (1 if none).
configured_nodes() {
    local n=1
    [[ -r $ETC/nodes ]] && read -r n <"$ETC/nodes"
    [[ $n =~ ^[1-9][0-9]*$ ]] && ((n <= MAX_NODES)) || n=1
    echo "$n"
}

# The slurmd port of node index I (0-based): node 0 the single-node port, then after mariadbd's.
node_port() {
    if (($1 == 0)); then echo "$SLURMD_PORT"; else echo $((PORT_BASE + 3 + $1)); fi
}

NODE=$(hostname -s)
set_nodes 1

case "${1:-}" in
    start) shift; lock; cmd_start "$@" ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 {start [--fresh] [--nodes N]|stop|status|env}" >&2
        exit 2
        ;;
esac
