"""Quantize the float default model with NVIDIA Model Optimizer (nvidia-modelopt) on the CPU and score it
in process (ModelOpt's simulated quantization), for bench/accuracy_vs_peers.py. Prints one JSON line.

    .modelopt-venv/bin/python bench/peers/modelopt_run.py --model-dir ~/.cache/quantlab/models/smollm2-135m-float32 \\
        --scheme FP8_PER_CHANNEL_PER_TOKEN --samples-file .cache/bench/samples.json --eval-ids .cache/bench/eval_ids.json

Set up its venv with bench/peers/setup_modelopt_venv.sh. Schemes are ModelOpt's own configs, with the
INT4 block size set to 64 (this model's 576-wide hidden size rules out 128) and lm_head left alone:

FP8_PER_CHANNEL_PER_TOKEN  FP8 per-channel weights, dynamic per-token FP8 activations (= fp8-dynamic).
INT4_AWQ_G64               INT4 symmetric weights in groups of 64, ModelOpt's AWQ ("awq_lite").
W4A16_NVFP4                NVFP4 weights only (= nvfp4a16).
NVFP4                      NVFP4 weights and activations (= nvfp4 W4A4).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

SCHEMES = ("FP8_PER_CHANNEL_PER_TOKEN", "INT4_AWQ_G64", "W4A16_NVFP4", "NVFP4")


def _config(scheme: str) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy({"FP8_PER_CHANNEL_PER_TOKEN": mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, "INT4_AWQ_G64": mtq.INT4_AWQ_CFG,
                         "W4A16_NVFP4": mtq.W4A16_NVFP4_CFG, "NVFP4": mtq.NVFP4_DEFAULT_CFG}[scheme])
    if scheme == "INT4_AWQ_G64":
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = 64
    return cfg


def _nll(model, ids) -> float:
    import torch

    with torch.no_grad():
        return float(model(ids, labels=ids).loss.float())


def run(args) -> dict:
    import importlib.metadata as md

    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM

    windows = json.loads(Path(args.samples_file).read_text())["samples"]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    def forward_loop(m):
        with torch.no_grad():
            for w in windows:
                m(torch.tensor([w]))

    t0 = time.perf_counter()
    model = mtq.quantize(model, _config(args.scheme), forward_loop)
    calib_seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    data = json.loads(Path(args.eval_ids).read_text())
    nll = [_nll(model, torch.tensor([w])) for w in data["wide"]]
    return {"ok": True, "ppl": math.exp(_nll(model, torch.tensor([data["ids"]]))), "ppl_wide": math.exp(sum(nll) / len(nll)),
            "nll_wide": nll, "calib_seconds": round(calib_seconds, 2), "peak_rss_mib": round(peak, 1), "scheme": args.scheme,
            "eval_dtype": "float32", "modelopt_version": md.version("nvidia-modelopt"),
            "transformers_version": md.version("transformers"), "torch_version": md.version("torch")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--samples-file", required=True)
    ap.add_argument("--eval-ids", required=True)
    args = ap.parse_args()
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # the libraries print; keep stdout for the one JSON line
    try:
        result, code = run(args), 0
    except Exception as exc:  # noqa: BLE001 - report every failure as one JSON line
        import traceback

        traceback.print_exc()
        result, code = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}, 1
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
