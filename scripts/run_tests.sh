#!/usr/bin/env bash
# The test command behind `make test` and .ci/run: caches go to a temp dir, nothing
# is downloaded (HF offline). Tests marked `slurm` start the local SLURM cluster
# (scripts/slurm_cluster/cluster.sh, through tests/slurm_cluster.py); if it was not
# already up, it is stopped again afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$(mktemp -d /tmp/finellama-hf.XXXXXX)}"
export FINELLAMA_CACHE="${FINELLAMA_CACHE:-$HF_HOME/finellama_rl}"
export TOKENIZERS_PARALLELISM=false
cluster_was_up=0
bash scripts/slurm_cluster/cluster.sh status >/dev/null 2>&1 && cluster_was_up=1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$cluster_was_up" = 0 ]; then
  bash scripts/slurm_cluster/cluster.sh stop >/dev/null 2>&1 || true
fi
exit "$rc"
