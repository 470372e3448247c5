#!/usr/bin/env bash
# GPU acceptance check on a machine without network (issue 14): install the carried wheels
# from .whl/ (made here by `benchmarks/gpu_wheels.py download`) into a private folder that
# shadows the machine's own packages, then run benchmarks/gpu_check.py. Its JSON, markdown and
# this log go to $OUT when set (the device tool's result folder), else benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh                       # the whole check, budget 480 s
#   bash benchmarks/gpu_check.sh --sections ladder     # any gpu_check.py arguments
#   FINELLAMA_WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${FINELLAMA_WHEELS:-.whl}
python=${PYTHON:-python3}
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=${FINELLAMA_SITE_DIR:-/tmp/finellama-site}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
else
    echo "no wheels in $wheels: using the installed packages"
fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
