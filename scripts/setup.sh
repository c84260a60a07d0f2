#!/usr/bin/env bash
# Create .venv and install hones with its test tools.
#   CPU machines (default): the CPU build of torch==2.13.0 first, from PyTorch's CPU index (PyPI's
#   Linux torch wheel is the CUDA build, with about 3 GB of nvidia-* packages), so no CUDA build is pulled.
#   GPU machines: HONES_TORCH=cuda bash scripts/setup.sh  (torch==2.13.0 from PyPI, the CUDA build;
#   a CPU build already in .venv is replaced; HONES_TORCH_INDEX=https://download.pytorch.org/whl/cu<ver>
#   picks another CUDA version), or pre-install your CUDA torch in the venv and set HONES_TORCH=keep.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# a newer pip is nice to have, not needed: say so and go on if it cannot be had
python -m pip install -q --upgrade pip >/dev/null 2>&1 || echo "scripts/setup.sh: could not upgrade pip; going on with $(python -m pip --version)" >&2
TORCH="torch==2.13.0"
case "${HONES_TORCH:-cpu}" in
  # --index-url replaces the configured index; where PyTorch's cannot be reached (a mirror-only
  # host) the plain install from the configured sources follows
  cpu)  python -m pip install -qq --index-url "${HONES_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" --timeout 15 --retries 1 "$TORCH" \
          || python -m pip install -q "$TORCH" ;;
  cuda)
    if python -c 'import sys, torch; sys.exit(0 if "+cpu" in torch.__version__ else 1)' 2>/dev/null; then
      python -m pip uninstall -q -y torch   # a CPU build would "already satisfy" the pin
    fi
    if [ -n "${HONES_TORCH_INDEX:-}" ]; then
      python -m pip install -q --index-url "$HONES_TORCH_INDEX" "$TORCH"
    else
      python -m pip install -q "$TORCH"
    fi
    python -c 'import torch; print("scripts/setup.sh: CUDA available:", torch.cuda.is_available(), "(torch", torch.__version__ + ")")' ;;
  keep) ;;
  *) echo "scripts/setup.sh: HONES_TORCH must be cpu, cuda or keep (got '${HONES_TORCH}')" >&2; exit 2 ;;
esac
python -m pip install -q -e ".[test]"
python -c "import torch, lightning, transformers; print(f'hones env ready: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
