#!/usr/bin/env bash
# Issue 17's H200 serving measurements, in stages short enough for one device call each (<10 min).
# Written by the serving stream and NOT yet run on a GPU: the figures in docs/performance.md must come
# from running it (each stage prints the command, device and date into its results.json).
#
#   bench/serving_h200.sh source              random Llama-3-8B-shaped HF model (bf16, 16 GB) in $W/src
#   bench/serving_h200.sh checkpoints         RTN checkpoints of it: fp8 (W8A8 + FP8 KV), int8, w4a16, nvfp4 (weights)
#   bench/serving_h200.sh build NAME          engine $W/eng-NAME (NAME: bf16 fp8 int8 w4a16 nvfp4, and
#                                             bf16kv8 = bf16 weights with an FP8 KV cache, for KV at a fixed budget)
#   bench/serving_h200.sh offline NAME SHAPE  offline sweep at 1,16,64,256 concurrent (SHAPE: 512x128 1000x1000 4096x256)
#   bench/serving_h200.sh online NAME         Poisson-rate sweep at 512x128 through the HTTP server
#   (FP8 against BF16 KV at one memory budget: `offline bf16 4096x256` beside `offline bf16kv8 4096x256`;
#   both engines get the same kv_cache_memory_fraction, so compare "seqs max" and out tok/s at c=256.)
#
# The HF baseline (transformers generate, same device and dtype, same prompts) runs beside the bf16
# engine at 512x128 only: at 4096 in and batch 256 its un-paged KV cache alone would exceed the GPU.
# Environment: W (work dir, default /tmp/quantlab-h200), QL (the quantlab command, default `quantlab`).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-/tmp/quantlab-h200}
QL=${QL:-quantlab}
OUT=bench/results/serving/$(date -u +%Y-%m-%d)
mkdir -p "$W" "$OUT"

case "${1:-}" in
source)
  # The engine stream's random Llama-3-8B-shaped BF16 model (bench/engine_speed.py), not a second copy.
  python -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench')
from engine_speed import SHAPE, write_random_llama
write_random_llama(Path(sys.argv[1]), SHAPE)" "$W/src"
  ;;
checkpoints)
  for pair in fp8:fp8-static int8:w8a8-int8 w4a16:w4a16-rtn nvfp4:nvfp4a16; do
    name=${pair%%:*}; recipe=${pair#*:}
    $QL calibrate "recipes/$recipe.yaml" --model "$W/src" --output "$W/ckpt-$name" --num-samples 8 --seq-len 256 \
      --device cuda --quiet --overwrite
  done
  ;;
build)
  name=$2; src="$W/ckpt-$name"; kv=()
  [ "$name" = bf16 ] && src="$W/src"
  [ "$name" = bf16kv8 ] && src="$W/src" && kv=(--kv-cache-dtype fp8_e4m3)
  $QL build "$src" --output "$W/eng-$name" --max-batch-size 256 --max-seq-len 5120 --max-num-tokens 8192 \
    --device cuda --skip-gates --overwrite "${kv[@]}"
  ;;
offline)
  # One run (one engine load) over the four levels, each with 4x its concurrency in requests (at least 8).
  name=$2; shape=$3; in=${shape%x*}; out=${shape#*x}
  extra=()
  if [ "$name" = bf16 ] && [ "$shape" = 512x128 ]; then extra=(--baseline hf --hf-model "$W/src"); fi
  $QL bench "$W/eng-$name" --mode offline --input-len "$in" --output-len "$out" --num-requests 8,64,256,1024 \
    --concurrency 1,16,64,256 --output "$OUT/offline-$name-$shape" --overwrite "${extra[@]}"
  ;;
online)
  name=$2
  $QL bench "$W/eng-$name" --mode online --input-len 512 --output-len 128 --num-requests 256 \
    --request-rate 1,4,16,64,inf --output "$OUT/online-$name-512x128" --overwrite
  ;;
*)
  sed -n '2,20p' "$0"; exit 2 ;;
esac
