#!/usr/bin/env bash
# Smoke test of the SLURM cluster of cluster.sh (run it after `cluster.sh start`):
# a plain job COMPLETED, a job over --mem ends OUT_OF_MEMORY, `scontrol requeue`
# re-runs a job (SLURM_RESTART_COUNT 0 -> 1), a submitit job returns its result.
# With two or more nodes (`cluster.sh start --nodes 2`) also: `srun -N2` runs one
# task on each node, and --mem is enforced per node (a 2-node job whose task on the
# second node goes over --mem: that step ends OUT_OF_MEMORY, the first node's task
# finishes). Prints the time each check took.
#
# Usage: scripts/slurm_cluster/smoke.sh            # PYTHON=python with submitit (default python3)
#        PYTHON=/path/to/venv/bin/python scripts/slurm_cluster/smoke.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
eval "$("$HERE/cluster.sh" env)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/finellama-slurm-smoke.XXXXXX)"
chmod 755 "$WORK"
FAILED=0

say() { echo "[slurm-smoke] $*"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }
job_state() { sacct -j "$1" -n -X -P -o State 2>/dev/null | head -n 1 | awk '{print $1}'; }

# wait_state JOB TIMEOUT_S: wait until the job's accounting state is final.
wait_state() {
    local j=$1 deadline=$((SECONDS + $2)) s
    while ((SECONDS < deadline)); do
        s=$(job_state "$j")
        case $s in COMPLETED | FAILED | OUT_OF_MEMORY | CANCELLED | TIMEOUT | NODE_FAIL) echo "$s"; return 0 ;; esac
        sleep 0.5
    done
    echo "${s:-NONE}"
}

check() { # NAME EXPECTED GOT T0
    if [[ $3 == "$2" ]]; then say "ok   $1: $3 ($(since "$4"))"; else say "FAIL $1: expected $2, got $3"; FAILED=1; fi
}

t=$EPOCHREALTIME
j=$(sbatch --parsable -o "$WORK/%j.out" --wrap hostname)
check "sbatch --wrap hostname (job $j)" COMPLETED "$(wait_state "$j" 60)" "$t"

t=$EPOCHREALTIME
j=$(sbatch --parsable --mem=100M -o "$WORK/%j.out" \
    --wrap "python3 -c 'x=bytearray(600*1024*1024); import time; time.sleep(5)'")
check "600 MB under --mem=100M (job $j)" OUT_OF_MEMORY "$(wait_state "$j" 60)" "$t"

# shellcheck disable=SC2016 # expanded by the job, not here
j=$(sbatch --parsable -o "$WORK/%j.out" --open-mode=append \
    --wrap 'echo "restart_count=${SLURM_RESTART_COUNT:-0}"; sleep 60')
deadline=$((SECONDS + 60))
until grep -q restart_count=0 "$WORK/$j.out" 2>/dev/null || ((SECONDS >= deadline)); do sleep 0.2; done
t=$EPOCHREALTIME
scontrol requeue "$j"
deadline=$((SECONDS + 90))
until grep -q restart_count=1 "$WORK/$j.out" 2>/dev/null || ((SECONDS >= deadline)); do sleep 0.2; done
got=$(grep -o 'restart_count=[0-9]*' "$WORK/$j.out" | tail -n 1 || true)
check "scontrol requeue (job $j) runs again" restart_count=1 "$got" "$t"
scancel "$j" || true

nodes=$(sinfo -h -N -p debug -o %N | sort -u | wc -l)
if ((nodes >= 2)); then
    t=$EPOCHREALTIME
    got=$(srun -N2 --ntasks-per-node=1 --mem=50M printenv SLURMD_NODENAME | sort -u | wc -l)
    check "srun -N2: one task on each of 2 nodes" 2 "$got" "$t"

    t=$EPOCHREALTIME
    # shellcheck disable=SC2016 # expanded by the tasks, not here
    j=$(sbatch --parsable -N2 --ntasks-per-node=1 --mem=200M -o "$WORK/%j.out" --wrap 'srun -l python3 -c "
import os, time
mb = 400 if os.environ[\"SLURM_NODEID\"] == \"1\" else 150
x = bytearray(mb * 1024 * 1024)
for i in range(0, len(x), 4096): x[i] = 1
time.sleep(2)
print(\"node\", os.environ[\"SLURM_NODEID\"], \"finished\", flush=True)"')
    wait_state "$j" 60 >/dev/null
    got="$(sacct -j "$j.0" -n -P -o State | head -n 1)/$(grep -c 'node 0 finished' "$WORK/$j.out" || true)"
    check "2-node job, node 2 over --mem=200M (job $j): step state/node-1 task finished" OUT_OF_MEMORY/1 "$got" "$t"
fi

if "$PYTHON" -c 'import submitit' 2>/dev/null; then
    t=$EPOCHREALTIME
    got=$("$PYTHON" - "$WORK/submitit" <<'EOF'
import sys, submitit
ex = submitit.AutoExecutor(folder=sys.argv[1] + "/%j", cluster="slurm")
ex.update_parameters(slurm_partition="debug", slurm_mem="512M", cpus_per_task=1,
                     timeout_min=5, slurm_use_srun=False)
print(ex.submit(pow, 6, 2).result())
EOF
    ) || got="error: $got"
    check "submitit job returns its result" 36 "$got" "$t"
else
    say "skip submitit: $PYTHON cannot import submitit (set PYTHON)"
fi

rm -rf "$WORK"
if ((FAILED == 0)); then say "all checks passed"; else say "SOME CHECKS FAILED"; fi
exit "$FAILED"
