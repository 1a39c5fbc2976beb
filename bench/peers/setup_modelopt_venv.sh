#!/usr/bin/env bash
# Create/refresh the virtual environment holding NVIDIA Model Optimizer (nvidia-modelopt) for the CPU
# side-by-side, apart from quantlab's and llm-compressor's (it wants its own transformers).
#
# Usage: bash bench/peers/setup_modelopt_venv.sh        (creates <repo>/.modelopt-venv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${MODELOPT_VENV:-$REPO/.modelopt-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==2.13.0+cpu" > "$CONSTRAINTS"  # keep the CPU build through every later install
"${PIP[@]}" -c "$CONSTRAINTS" "torch==2.13.0+cpu"
"${PIP[@]}" -c "$CONSTRAINTS" "nvidia-modelopt==0.47.0" "transformers==5.17.0" requests datasets
"$VENV/bin/python" -c "import importlib.metadata as m; [print(n, m.version(n)) for n in ('torch', 'nvidia-modelopt', 'transformers')]"
