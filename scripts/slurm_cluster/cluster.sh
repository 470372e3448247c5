#!/usr/bin/env bash
# Real single-node SLURM cluster (Debian 12 / SLURM 22.05) for the tests of
# finellama_rl: munged + MariaDB + slurmdbd + slurmctld + slurmd, all started
# by hand (no systemd), all config and state under one directory.
#
# Usage (as root):
#   scripts/slurm_cluster/cluster.sh start    # install packages if missing, bring the cluster up
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
#                              slurmctld, slurmd, slurmdbd, mariadbd. They differ from
#                              SLURM's defaults so a system SLURM can stay as it is.
#   FINELLAMA_SLURM_TIMEOUT    seconds to wait for each daemon / the node (default 60).
#
# The cluster: one node named `hostname -s` (NodeAddr 127.0.0.1), partitions
# `debug` (default) and `cpu`, MaxTime=INFINITE, accounting through slurmdbd
# (so sacct works, which submitit polls), cgroup v1 memory enforcement (a job
# over --mem ends OUT_OF_MEMORY), JobRequeue=1 (scontrol requeue works).
# A daemon this script did not start (pid files under $FINELLAMA_SLURM_DIR/pids,
# checked against the process's start time and command) is never signalled; a
# foreign slurmd makes `start` refuse (two slurmds on one host would fight over
# the same cgroups). Every daemon listens on 127.0.0.1 only; the munge key and
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

DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
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
    [[ $(pid_command "$pid") == "$1" ]] || return 1
    echo "$pid"
}

alive() { recorded_pid "$1" >/dev/null; }

# launch NAME CMD...: run CMD in the foreground of a new session, in the
# background of this script, output to $LOG/NAME.out; record its pid.
launch() {
    local name=$1 pid info
    shift
    setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null 9>&- &
    pid=$!
    info=$(pid_stat "$pid") || { err "$name exited at once"; tail_logs "$name"; exit 1; }
    local i
    for ((i = 0; i < 100; i++)); do # until setsid has exec-ed the daemon (recorded_pid checks the command)
        [[ $(pid_command "$pid" || true) == "$name" ]] && break
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
node_state() { timeout 10 sinfo -h -N -n "$NODE" -p debug -o %t 2>/dev/null | head -n 1; }
node_ok() {
    case "$(node_state)" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

healthy() {
    local d
    for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
    node_ok && sacct_ok
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
    mkdir -p "$ETC" "$LOG" "$RUN" "$PIDS" "$SPOOL/ctld" "$SPOOL/slurmd" "$MUNGE_DIR" "$DIR/tmp"
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
    mem=$((${HW[RealMemory]:-1024} * 95 / 100))

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
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
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
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=${HW[CPUs]:-1} Boards=${HW[Boards]:-1} SocketsPerBoard=${HW[SocketsPerBoard]:-1} CoresPerSocket=${HW[CoresPerSocket]:-1} ThreadsPerCore=${HW[ThreadsPerCore]:-1} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
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

start_slurmd() {
    launch slurmd slurmd -D -f "$SLURM_CONF" -N "$NODE"
}

# Node idle (resuming it if an old run left it down/drained), then sacct.
wait_node_and_sacct() {
    local t=$EPOCHREALTIME deadline=$((SECONDS + WAIT_S)) state next_resume=$((SECONDS + 2))
    while ! node_ok; do
        alive slurmd || { err "slurmd exited"; tail_logs slurmd; exit 1; }
        alive slurmctld || { err "slurmctld exited"; tail_logs slurmctld; exit 1; }
        state=$(node_state || true)
        if [[ $state =~ ^(down|drain|drng|fail|failg)$ ]] && ((SECONDS >= next_resume)); then
            log "node $NODE is '$state' ($(timeout 5 sinfo -h -R -n "$NODE" -o %E 2>/dev/null | head -n 1)); resuming it"
            timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            next_resume=$((SECONDS + 5))
        fi
        if ((SECONDS >= deadline)); then
            err "node $NODE not idle within ${WAIT_S}s (state: '${state:-?}')"
            timeout 5 sinfo -N -l >&2 || true
            tail_logs slurmd
            tail_logs slurmctld
            exit 1
        fi
        sleep 0.2
    done
    log "node $NODE is $(node_state) ($(since "$t"))"
    wait_for slurmdbd "sacct" sacct_ok
}

# Foreign SLURM daemons: leave them alone; refuse if a foreign slurmd runs.
check_foreign() {
    local d pid ours
    for d in slurmctld slurmd slurmdbd; do
        ours=$(recorded_pid "$d" || true)
        for pid in $(pgrep -x "$d" || true); do
            [[ $pid == "$ours" ]] && continue
            [[ $(pid_stat "$pid" || echo Z) == Z* ]] && continue # zombie: PID 1 may not reap
            if [[ $d == slurmd ]]; then
                err "a slurmd not started from $DIR is running (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))."
                err "Refusing to start a second slurmd on this host; it is left untouched."
                exit 1
            fi
            log "note: a $d not started by this script is running (pid $pid); leaving it alone"
        done
    done
    local name port
    for name in slurmctld:$CTLD_PORT slurmd:$SLURMD_PORT slurmdbd:$DBD_PORT mariadbd:$DB_PORT; do
        port=${name#*:}
        name=${name%%:*}
        if ! alive "$name" && port_open "$port"; then
            err "port $port (for $name) is already in use by another process; set FINELLAMA_SLURM_PORT_BASE"
            exit 1
        fi
    done
}

# ------------------------------------------------------------- subcommands --

cmd_stop() {
    local i d pid t any=0
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
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
    ((any)) || log "nothing to stop in $DIR"
    log "stopped ($(elapsed))"
}

cmd_start() {
    local fresh=0
    case ${1:-} in
        --fresh) fresh=1 ;;
        "") ;;
        *) err "unknown option for start: $1"; exit 2 ;;
    esac
    if ((fresh)); then
        [[ -d $PIDS ]] && cmd_stop
        case $DIR in /) err "refusing to wipe /"; exit 1 ;; esac
        log "wiping $DIR"
        find "$DIR" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
    fi
    if [[ -f $SLURM_CONF ]] && command -v sinfo >/dev/null && healthy; then
        log "cluster in $DIR is already up and healthy"
        exit 0
    fi
    log "starting the cluster in $DIR"
    install_packages
    check_foreign
    write_config
    local d
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            log "$d already running (pid $(recorded_pid "$d"))"
        else
            log "starting $d ..."
            "start_$d"
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
    log "cluster up ($(elapsed)); use: eval \"\$($0 env)\""
}

cmd_status() {
    local d pid ok=0
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

NODE=$(hostname -s)

case "${1:-}" in
    start) shift; lock; cmd_start "$@" ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 {start [--fresh]|stop|status|env}" >&2
        exit 2
        ;;
esac
