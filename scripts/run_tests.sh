#!/usr/bin/env bash
# The test command behind `make test` and .ci/run. Caches go to a temp dir, nothing is
# downloaded (HF offline), the fit memory goes to a temp file.
#
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
#   scripts/run_tests.sh                 # both phases
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

rc=0
if [[ " $PHASES " == *" 1 "* ]]; then
    shadow=$(mktemp -d /tmp/finellama-noslurm.XXXXXX)
    up_before=0
    cluster_up && up_before=1
    t=$EPOCHREALTIME
    echo "=== phase 1: tests not marked slurm, SLURM binaries hidden from PATH"
    PATH="$(path_without_slurm "$shadow")" FINELLAMA_NO_CLUSTER=1 \
        .venv/bin/python -m pytest -q -m "not slurm" -p no:cacheprovider "$@" || rc=$?
    echo "=== phase 1: exit $rc in $(seconds "$t") s"
    ((rc == 5)) && rc=0 # no test selected
    rm -rf "$shadow"
    if ((up_before == 0)) && cluster_up; then
        echo "phase 1 started the SLURM cluster: a test needs SLURM without being marked slurm" >&2
        bash "$CLUSTER" stop >/dev/null 2>&1 || true
        rc=1
    fi
fi
if [[ " $PHASES " == *" 2 "* ]]; then
    cluster_was_up=0
    cluster_up && cluster_was_up=1
    t=$EPOCHREALTIME
    echo "=== phase 2: tests marked slurm, on the local SLURM cluster"
    rc2=0
    .venv/bin/python -m pytest -q -m slurm -p no:cacheprovider "$@" || rc2=$?
    echo "=== phase 2: exit $rc2 in $(seconds "$t") s"
    ((rc2 == 5)) && rc2=0 # no test selected (e.g. -k matched none): not a failure
    ((rc == 0)) && rc=$rc2
    if [[ "$cluster_was_up" = 0 ]]; then
        bash "$CLUSTER" stop >/dev/null 2>&1 || true
    fi
fi
exit "$rc"
