#!/usr/bin/env bash
# What this SLURM does with job arrays, the facts issue 22's array design rests on
# (run it after `cluster.sh start`, or on a real cluster's login node with a partition
# that starts two 1-CPU jobs at once: PARTITION=... scripts/slurm_cluster/probe_arrays.sh).
# About a minute. Checks (FAIL if not so, exit 1):
#   - sbatch --test-only accepts an --array=0-5%2 script and refuses one over MaxArraySize;
#   - squeue -r lists a throttled array's pending tasks one per line (without -r: one range line);
#   - `scontrol requeue A_i` requeues task i only;
#   - --dependency=afterany:A_i starts when task i ends while its siblings still run;
#   - a requeue does not satisfy afterany.
# Reports (observed, version-dependent; the design must not rely on them):
#   - the task whose own SLURM_JOB_ID equals the array id (the last to start), and what
#     `scontrol requeue <that id>` does (22.05.8: requeues every task of the array);
#   - `scancel <raw job id of a task>` (22.05.8: "Invalid job id specified"; A_i works);
#   - sacct for a task that has not started yet (22.05.8: no line; only A_[range]).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z ${SLURM_CONF:-} && -x $HERE/cluster.sh ]] && "$HERE/cluster.sh" env >/dev/null 2>&1; then
    eval "$("$HERE/cluster.sh" env)"
fi
PART=${PARTITION:+--partition=$PARTITION}
WORK="$(mktemp -d /tmp/finellama-slurm-arrays.XXXXXX)"
chmod 755 "$WORK"
FAILED=0
JOBS=()
trap 'scancel "${JOBS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

say() { echo "[slurm-arrays] $*"; }
check() { # NAME EXPECTED GOT
    if [[ $3 == "$2" ]]; then say "ok   $1: $3"; else say "FAIL $1: expected $2, got $3"; FAILED=1; fi
}
restarts_of() { grep -o 'restart=[0-9]*' "$WORK/a_$1.out" 2>/dev/null | tail -n 1 | cut -d= -f2; }
wait_until() { # TIMEOUT_S CMD...: poll CMD until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

cat >"$WORK/array.sh" <<EOF
#!/bin/bash
#SBATCH --array=0-3%4
#SBATCH --mem=50M
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$WORK/a_%a.out
echo "task \$SLURM_ARRAY_TASK_ID raw=\$SLURM_JOB_ID restart=\${SLURM_RESTART_COUNT:-0}"
sleep 60
EOF

# --test-only
got=$(sed 's/0-3%4/0-5%2/' "$WORK/array.sh" | sbatch $PART --test-only >/dev/null 2>&1 && echo accepted || echo refused)
check "sbatch --test-only --array=0-5%2" accepted "$got"
max=$(scontrol show config | awk '/^MaxArraySize/ {print $3}')
got=$(sed "s/0-3%4/0-${max:-1001}/" "$WORK/array.sh" | sbatch $PART --test-only >/dev/null 2>&1 && echo accepted || echo refused)
check "sbatch --test-only --array=0-$max (MaxArraySize $max)" refused "$got"

# squeue -r with a throttled array
A=$(sed 's/0-3%4/0-3%1/' "$WORK/array.sh" | sbatch $PART --parsable)
JOBS+=("$A")
wait_until 30 bash -c "squeue -h -r -j $A -t R -o %i | grep -q ." || true
check "squeue -r: one line per task of a throttled array" 4 "$(squeue -h -r -j "$A" -o %i | wc -l)"
say "note: without -r: $(squeue -h -j "$A" -o '%i:%T' | tr '\n' ' ')"
sleep 3
say "note: sacct -X -j ${A}_3 while it has not started: '$(sacct -n -X -P -j "${A}_3" -o JobID,State | tr '\n' ' ')'; sacct -X -j $A: $(sacct -n -X -P -j "$A" -o JobID,State | tr '\n' ' ')"
scancel "$A"
wait_until 30 bash -c "[[ -z \$(squeue -h -j $A -o %i) ]]" || true
rm -f "$WORK"/a_*.out

# requeue / dependency / scancel on one task of a running 2-task array (fits one 2-CPU node)
A=$(sed 's/0-3%4/0-1/' "$WORK/array.sh" | sbatch $PART --parsable)
JOBS+=("$A")
if ! wait_until 60 bash -c "[[ \$(cat $WORK/a_*.out 2>/dev/null | grep -c restart=0) == 2 ]]"; then
    say "FAIL the 2 tasks of array $A did not both start within 60 s"
    exit 1
fi
same=$(squeue -h -r -j "$A" -o '%i %A' | awk -v a="$A" '$2 == a {print $1}')
say "note: task whose own SLURM_JOB_ID is the array id $A: ${same:-none}"
i=0 k=1
[[ ${A}_0 == "$same" ]] && i=1 k=0
W=$(sbatch $PART --parsable --mem=50M -o /dev/null --dependency="afterany:${A}_$k" --wrap true)
JOBS+=("$W")
scontrol requeue "${A}_$i"
wait_until 60 bash -c "[[ \$(grep -o 'restart=[0-9]*' $WORK/a_$i.out | tail -n 1) == restart=1 ]]" || true
sleep 2
check "scontrol requeue ${A}_$i: restarts of task $i, then of task $k" "1,0" "$(restarts_of $i),$(restarts_of $k)"
check "afterany:${A}_$k waits while task $k runs (task $i requeued)" PENDING "$(squeue -h -j "$W" -o %T)"

raw=$(squeue -h -j "${A}_$i" -o %A)
rc=0
out=$(scancel -v "$raw" 2>&1 | grep -i error) || true
scancel "$raw" 2>/dev/null || rc=$?
sleep 2
say "note: scancel $raw (own job id of ${A}_$i): exit $rc, silent without -v; with -v: '${out:-no error}'; ${A}_$i is then $(squeue -h -j "${A}_$i" -o %T)"
if [[ -n $same ]]; then
    scontrol requeue "$A"
    wait_until 40 bash -c "[[ \$(cat $WORK/a_*.out | grep -c restart=) -ge 5 ]]" || true
    sleep 2
    say "note: scontrol requeue $A (array id = own id of $same): restarts now task $i: $(restarts_of $i), task $k: $(restarts_of $k)"
fi
check "afterany:${A}_$k still waits after requeues" PENDING "$(squeue -h -j "$W" -o %T)"
scancel "${A}_$k"
wait_until 30 bash -c "[[ \$(sacct -n -X -P -j $W -o State | head -n 1) == COMPLETED ]]" || true
check "afterany:${A}_$k ran when task $k ended, task $i still in the queue" "COMPLETED/1" \
    "$(sacct -n -X -P -j "$W" -o State | head -n 1)/$(squeue -h -r -j "$A" -o %i | wc -l)"

if ((FAILED == 0)); then say "all checks passed"; else say "SOME CHECKS FAILED"; fi
exit "$FAILED"
