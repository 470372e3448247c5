#!/usr/bin/env bash
# The test command behind `make test` and .ci/run. Caches go to a temp dir, nothing is
# downloaded (HF offline), the fit memory goes to a temp file.
#
# First, what the tests need from the system is installed (Chromium, for the report's
# headless screenshot: scripts/install_chromium.sh; skipped where apt is not ours), before
# phase 1 builds its PATH: that PATH is a folder of symlinks made once, so a package
# installed later into a folder it shadows (/usr/bin, when SLURM is installed there) would
# stay invisible to phase 1 (issue 19: `make test` failed the first time on such a machine).
# Phase 1, "fresh machine": every test not marked `slurm`, with the SLURM binaries
# (sbatch srun sinfo squeue sacct scontrol scancel salloc sbcast sattach) hidden from
# PATH, so a test that needs SLURM without saying so fails here as it would on a
# machine where SLURM was never installed; starting the cluster is forbidden
# (FINELLAMA_NO_CLUSTER=1) and checked.
# Phase 2: the tests marked `slurm`, against the local cluster
# (scripts/slurm_cluster/cluster.sh, started through tests/slurm_cluster.py with two
# nodes, always: the multi-node tests need them, and a node-count switch would requeue
# running jobs); if it was not up before, it is stopped again afterwards.
#
# Both phases run at the same time (phase 2 mostly waits on the scheduler); its lines
# are prefixed `[phase 2]`, and its test files run side by side (FINELLAMA_SLURM_WORKERS,
# default 3; 1: one after the other).
#
#   scripts/run_tests.sh                 # both phases, at once
#   FINELLAMA_TEST_SERIAL=1 FINELLAMA_TEST_WORKERS=1 FINELLAMA_SLURM_WORKERS=1 scripts/run_tests.sh   # nothing side by side
#   FINELLAMA_TEST_PHASES=1 scripts/run_tests.sh   # phase 1 only (no cluster)
#   scripts/run_tests.sh -x -k launch    # extra pytest arguments go to both phases
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$(mktemp -d /tmp/finellama-hf.XXXXXX)}"
export FINELLAMA_CACHE="${FINELLAMA_CACHE:-$HF_HOME/finellama_rl}"
export FINELLAMA_FIT_MEMORY="${FINELLAMA_FIT_MEMORY:-$(mktemp -d /tmp/finellama-fitmem.XXXXXX)/fit_memory.json}"
export TOKENIZERS_PARALLELISM=false
PHASES="${FINELLAMA_TEST_PHASES:-1 2}"
SLURM_BINARIES=(sbatch srun sinfo squeue sacct scontrol scancel salloc sbcast sattach)
CLUSTER=scripts/slurm_cluster/cluster.sh

# PATH without SLURM: each PATH folder that holds a SLURM binary is replaced by one
# folder of symlinks to everything else in it.
path_without_slurm() {
    local shadow=$1 dir item name out="" hidden
    mkdir -p "$shadow"
    local IFS=:
    for dir in $PATH; do
        hidden=0
        for name in "${SLURM_BINARIES[@]}"; do [[ -e $dir/$name ]] && hidden=1; done
        if ((hidden)); then
            for item in "$dir"/*; do
                name=${item##*/}
                [[ " ${SLURM_BINARIES[*]} " == *" $name "* || -e $shadow/$name ]] && continue
                ln -s "$item" "$shadow/$name"
            done
            [[ :$out: == *:$shadow:* ]] || out=${out:+$out:}$shadow
        else
            out=${out:+$out:}$dir
        fi
    done
    echo "$out"
}

cluster_up() { bash "$CLUSTER" status >/dev/null 2>&1; }
seconds() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'; }

# System packages the tests use, installed before phase 1 hides anything from PATH.
system_needs() {
    command -v chromium >/dev/null 2>&1 && return 0
    echo "=== installing Chromium for the report's screenshot test (scripts/install_chromium.sh; once per machine)"
    bash scripts/install_chromium.sh >/dev/null 2>&1 || echo "    not installed (exit $?): that test installs or skips itself"
}

# Phase 1 in this shell; its output as it comes.
phase1() {
    local shadow rc=0 t=$EPOCHREALTIME
    shadow=$(mktemp -d /tmp/finellama-noslurm.XXXXXX)
    local workers=${FINELLAMA_TEST_WORKERS:-2}
    echo "=== phase 1: tests not marked slurm, SLURM binaries hidden from PATH ($workers test files at a time)"
    # Most tests keep one core busy: one pytest-xdist worker per CPU, a test file per worker
    # (its module fixtures built once); each worker has its own caches (tests/conftest.py).
    local xdist=()
    ((workers > 1)) && xdist=(-n "$workers" --dist loadfile)
    PATH="$(path_without_slurm "$shadow")" FINELLAMA_NO_CLUSTER=1 \
        .venv/bin/python -m pytest -q -m "not slurm" -p no:cacheprovider "${xdist[@]}" "$@" || rc=$?
    echo "=== phase 1: exit $rc in $(seconds "$t") s"
    ((rc == 5)) && rc=0 # no test selected
    rm -rf "$shadow"
    return "$rc"
}

# Phase 2; the caller stops the cluster afterwards if it started it.
phase2() {
    local rc=0 t=$EPOCHREALTIME
    local workers=${FINELLAMA_SLURM_WORKERS:-3}
    echo "=== phase 2: tests marked slurm, on the local SLURM cluster ($workers test files at a time)"
    # One pytest worker per test file (pytest-xdist --dist loadfile): each file's jobs wait
    # on real time limits and requeues, and the cluster runs them side by side.
    local xdist=()
    ((workers > 1)) && xdist=(-n "$workers" --dist loadfile)
    .venv/bin/python -m pytest -q -m slurm -p no:cacheprovider "${xdist[@]}" "$@" || rc=$?
    echo "=== phase 2: exit $rc in $(seconds "$t") s"
    ((rc == 5)) && rc=0 # no test selected (e.g. -k matched none): not a failure
    return "$rc"
}

rc=0
t_all=$EPOCHREALTIME
want1=0 want2=0
[[ " $PHASES " == *" 1 "* ]] && want1=1
[[ " $PHASES " == *" 2 "* ]] && want2=1
((want1)) && system_needs
cluster_was_up=0
cluster_up && cluster_was_up=1
if ((want1 && want2)) && [[ "${FINELLAMA_TEST_SERIAL:-0}" != 1 ]]; then
    # Both phases at once: phase 2 mostly waits on the scheduler (queueing, real time
    # limits, requeues), so phase 1 uses the CPUs meanwhile (docs/LOG.md: the serial
    # run took more than 20 minutes). Phase 2 gets caches and a fit memory of its own and
    # its lines prefixed; FINELLAMA_TEST_SERIAL=1 runs the phases one after the other.
    # That the cluster is up meanwhile does not open it to phase 1: its PATH has no
    # SLURM binaries, and conftest refuses to start the cluster (FINELLAMA_NO_CLUSTER=1).
    p2dir=$(mktemp -d /tmp/finellama-phase2.XXXXXX)
    (
        export HF_HOME=$p2dir/hf FINELLAMA_CACHE=$p2dir/hf/finellama_rl FINELLAMA_FIT_MEMORY=$p2dir/fit_memory.json
        phase2 "$@" 2>&1 | sed -u 's/^/[phase 2] /'
        exit "${PIPESTATUS[0]}"
    ) &
    p2pid=$!
    phase1 "$@" || rc=$?
    rc2=0
    wait "$p2pid" || rc2=$?
    ((rc == 0)) && rc=$rc2
    rm -rf "$p2dir"
else
    if ((want1)); then
        phase1 "$@" || rc=$?
        if ((cluster_was_up == 0)) && cluster_up; then
            echo "phase 1 started the SLURM cluster: a test needs SLURM without being marked slurm" >&2
            bash "$CLUSTER" stop >/dev/null 2>&1 || true
            rc=1
        fi
    fi
    if ((want2)); then
        rc2=0
        phase2 "$@" || rc2=$?
        ((rc == 0)) && rc=$rc2
    fi
fi
if ((want2 && cluster_was_up == 0)); then
    bash "$CLUSTER" stop >/dev/null 2>&1 || true
fi
echo "=== all: exit $rc in $(seconds "$t_all") s"
exit "$rc"
