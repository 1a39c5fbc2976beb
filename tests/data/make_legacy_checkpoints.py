"""Writes tests/data/legacy/*: two tiny checkpoints made by quantlab before scales became module data
(commit ac45ed3, where the writer recovered scales from ranges and the reader searched ranges back), plus
the logits the reader of that commit computed from each, on fixed token ids.

Kept to show how the fixtures were made; running it on a later commit writes that commit's output
instead, which is not what tests/checkpoint/test_legacy.py compares against.
Run: .venv/bin/python tests/data/make_legacy_checkpoints.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantlab.algorithms import RTNParams  # noqa: E402
from quantlab.checkpoint.reader import load_quantized  # noqa: E402
from quantlab.checkpoint.writer import write_checkpoint  # noqa: E402
from quantlab.data import CalibrationSet, digest  # noqa: E402
from quantlab.models import load_model  # noqa: E402
from quantlab.pipeline import calibrate  # noqa: E402
from quantlab.recipe.schema import (ActivationScheme, CalibrationConfig, KVCacheScheme, Recipe,  # noqa: E402
                                    SchemeGroup, Stage, WeightScheme)

HERE = Path(__file__).resolve().parent / "legacy"
VOCAB = 64
ATTN, MLP = ("re:.*self_attn\\..*",), ("re:.*mlp\\..*",)
CASES = {
    # static per-tensor fp8 and int8 input scales, per-head KV scales
    "static-fp8-int8-kvhead": ((SchemeGroup(ATTN, WeightScheme("fp8_e4m3", "channel"), ActivationScheme("fp8_e4m3", "tensor", False)),
                                SchemeGroup(MLP, WeightScheme("int8", "channel"), ActivationScheme("int8", "tensor", False))),
                               KVCacheScheme("fp8_e4m3", "head")),
    # nvfp4 weights and activations (input_global_scale), int4 asym packing, per-tensor KV scales
    "nvfp4-int4asym-kvtensor": ((SchemeGroup(ATTN, WeightScheme("nvfp4", "group", 16), ActivationScheme("nvfp4", "group", True)),
                                 SchemeGroup(MLP, WeightScheme("int4_asym", "group", 32))),
                                KVCacheScheme("fp8_e4m3", "tensor")),
}


def tiny_model_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)
    return path


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    model_dir = tiny_model_dir(HERE / "_float")
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(ids, "tests/data/make_legacy_checkpoints.py", digest(ids))
    for name, (groups, kv) in CASES.items():
        model, tokenizer = load_model(str(model_dir))
        recipe = Recipe(path="tests/data/make_legacy_checkpoints.py", text="# legacy fixture\n", sha256="0" * 64,
                        model="tiny-llama", output="unused", calibration=CalibrationConfig(num_samples=4, seq_len=16),
                        schemes=groups, stages=(Stage("rtn", RTNParams()),), ignore=("lm_head",), kv_cache=kv,
                        export_dtype="bfloat16")
        result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
        out = write_checkpoint(model, tokenizer, recipe, calib, result, HERE / name).path
        loaded, _, _ = load_quantized(out)
        with torch.no_grad():
            logits = loaded(ids).logits
        safetensors.torch.save_file({"input_ids": ids, "logits": logits.contiguous()}, str(HERE / f"{name}.expected.safetensors"))
    shutil.rmtree(model_dir)


if __name__ == "__main__":
    main()
