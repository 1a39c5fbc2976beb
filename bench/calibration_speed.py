"""Layer-by-layer calibration speed and memory on a big model shape (GPU).

Builds a Llama-3-8B-shaped model with random weights (speed does not depend on the values; accuracy is
measured on real weights elsewhere), keeps it on the CPU, and calibrates its first ``--layers`` decoder
layers on the GPU with several recipes, one layer resident at a time. Reports seconds per layer, the
projection to all 32 layers, and peak GPU memory, which should stay near one layer plus its activations.

    python bench/calibration_speed.py --layers 4 --samples 128 --seq-len 2048 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab.algorithms import AWQParams, GPTQParams, RTNParams
from quantlab.data import CalibrationSet, digest
from quantlab.pipeline import calibrate
from quantlab.recipe.schema import ActivationScheme, CalibrationConfig, Recipe, SchemeGroup, Stage, WeightScheme

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
INT4 = SchemeGroup(("Linear",), WeightScheme("int4", "group", 128))
RECIPES = {
    "w4a16-rtn": (INT4, (Stage("rtn", RTNParams()),)),
    "w4a16-gptq": (INT4, (Stage("gptq", GPTQParams()),)),
    "w4a16-gptq-one-pass": (INT4, (Stage("gptq", GPTQParams(true_sequential=False)),)),
    "w4a16-awq": (INT4, (Stage("awq", AWQParams()), Stage("rtn", RTNParams()))),
    "fp8-dynamic": (SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "channel"), ActivationScheme("fp8_e4m3", "token", True)),
                    (Stage("rtn", RTNParams()),)),
}


def build_model(num_layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=num_layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.copy_(torch.randn(p.shape, generator=g).mul_(0.02))
    model.model.rotary_emb.__init__(config)  # its buffers were left empty on the meta device
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    calib = CalibrationSet(ids, "random tokens", digest(ids))
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "layers": args.layers,
               "samples": args.samples, "seq_len": args.seq_len, "runs": {}}
    for name in args.recipes.split(","):
        model = build_model(args.layers)
        group, stages = RECIPES[name]
        recipe = Recipe(path=name, text="", sha256="", model="llama3-8b-shape", output="", calibration=CalibrationConfig(),
                        schemes=(group,), stages=stages)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = calibrate(model, recipe, calib, device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        per_layer = [s.seconds for s in result.layers]
        results["runs"][name] = {"date": datetime.date.today().isoformat(), "seconds": seconds, "seconds_per_layer": per_layer,
                                 "projected_32_layers_min": sum(per_layer[1:]) / max(1, len(per_layer) - 1) * 32 / 60,
                                 "peak_gpu_mib": result.peak_mem_mib,
                                 "rel_mse": [s.rel_mse for s in result.layers]}
        print(name, json.dumps(results["runs"][name]), flush=True)
        del model
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
