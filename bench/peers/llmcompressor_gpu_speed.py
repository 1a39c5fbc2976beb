"""llm-compressor's GPTQ and AWQ speed on the Llama-3-8B shape, for the side-by-side with
bench/calibration_speed.py (same model builder, random weights, random tokens, first N layers).

Run on the device machine with llm-compressor installed beside its torch (wheels carried in, see
docs/accuracy.md), e.g.:

    python bench/peers/llmcompressor_gpu_speed.py --layers 3 --samples 128 --seq-len 2048 --out results.json

Prints one JSON line per recipe: calibration seconds (the oneshot call; the model is loaded on the
CPU first and llm-compressor onloads one layer at a time, like quantlab) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from calibration_speed import LLAMA3_8B, build_model  # noqa: E402


def recipe(name: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier

    if name == "w4a16-gptq":  # INT4 symmetric, groups of 128, no act order: quantlab's w4a16-gptq here
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], actorder=None)]
    if name == "w4a16-awq":
        return [AWQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    raise ValueError(name)


def main() -> None:
    import uuid

    import datasets.fingerprint
    from datasets import Dataset
    from llmcompressor import oneshot

    # On the device's Python 3.12 the carried datasets/dill fail to pickle a pyarrow type while
    # fingerprinting a map() for its cache; a random fingerprint (no caching) sidesteps that.
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--recipes", default="w4a16-gptq,w4a16-awq")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq_len] * args.samples})
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
               "samples": args.samples, "seq_len": args.seq_len, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(args.layers).save_pretrained(tmp)
        from tokenizers import Tokenizer, models
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
        for name in args.recipes.split(","):
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            oneshot(model=model, processor=tok, dataset=dataset, recipe=recipe(name), num_calibration_samples=args.samples,
                    max_seq_length=args.seq_len, shuffle_calibration_samples=False, batch_size=1)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            results["runs"][name] = {"seconds": seconds, "seconds_per_layer": seconds / args.layers,
                                     "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
            print(name, json.dumps(results["runs"][name]), flush=True)
            del model
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
