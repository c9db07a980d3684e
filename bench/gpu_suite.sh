#!/usr/bin/env bash
# The GPU suite in one call (#27): on a bare GPU machine (torch, transformers, peft, accelerate installed; no
# network), install the wheels bench/gpu_wheels.sh fetched beside it into a scratch target, then measure
# (bench/gpu_suite.py). Through the device tool:
#   run(command="bash bench/gpu_suite.sh --out $OUT", carry=["bench/.wheels"], timeout_s=600)
# On a CPU, every case with tiny models: bash bench/gpu_suite.sh --dry-run --out DIR
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${DIFFTUNE_WHEELS:-bench/.wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${DIFFTUNE_SITE:-/tmp/difftune_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_suite: the wheels in $WHEELS did not install" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_suite.py "$@"
