#!/usr/bin/env bash
# Wheels that the H200 machine's image lacks (it has torch, triton, transformers, aiohttp, prometheus-client,
# numpy, pandas, pyarrow, typer ...: /work/.library/device/KINDS.md), fetched here into .whl/ for the device
# tool to carry. Python 3.12 (the image's), manylinux x86_64; versions as this project's CPU set-up installs.
# On the device (carry: [".whl"]): `. scripts/device_env.sh` installs them and sets PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIP=".venv/bin/python -m pip"
pinned() { $PIP list --format=freeze 2>/dev/null | grep -i -E "^($(echo "$*" | tr ' ' '|'))==" ; }
BINARY="fastapi uvicorn starlette pydantic pydantic_core annotated-types typing-inspection opentelemetry-api
cryptography cffi pycparser httpx2 datasets dill multiprocess evaluate gguf lm_eval more-itertools pytablewriter
DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet nltk compressed-tensors loguru defusedxml"
$PIP download -q --dest .whl --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
    $(pinned $BINARY)
# Published as source only (pure Python): built into wheels here.
$PIP wheel -q --no-deps --wheel-dir .whl $(pinned rouge_score sqlitedict word2number)
ls .whl | wc -l
