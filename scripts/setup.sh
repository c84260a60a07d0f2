#!/usr/bin/env bash
# Create .venv and install hones with its test tools.
#   CPU machines (default): pins the CPU build torch==2.13.0 first, so no CUDA build is pulled.
#   GPU machines: HONES_TORCH=cuda bash scripts/setup.sh  (installs whatever torch pip resolves,
#   or pre-install your CUDA torch in the venv and set HONES_TORCH=keep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# a newer pip is nice to have, not needed: say so and go on if it cannot be had
python -m pip install -q --upgrade pip >/dev/null 2>&1 || echo "scripts/setup.sh: could not upgrade pip; going on with $(python -m pip --version)" >&2
case "${HONES_TORCH:-cpu}" in
  cpu)  python -m pip install -q "torch==2.13.0" ;;
  cuda) python -m pip install -q torch ;;
  keep) ;;
  *) echo "scripts/setup.sh: HONES_TORCH must be cpu, cuda or keep (got '${HONES_TORCH}')" >&2; exit 2 ;;
esac
python -m pip install -q -e ".[test]"
python -c "import torch, lightning, transformers; print(f'hones env ready: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
