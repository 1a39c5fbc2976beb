"""Fixtures: a tiny Llama saved as an "original model" directory, and quantlab checkpoints of it made by
the real pipeline and writer (seconds on the CPU), so the runner is tested on what ``calibrate`` writes."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab.checkpoint.writer import write_checkpoint
from quantlab.data import build_calibration_set
from quantlab.models import load_model, resolve_model
from quantlab.pipeline import calibrate
from quantlab.recipe import load_recipe

RECIPE = """\
model: {model}
output: {output}
dtype: float32
export_dtype: float32
calibration: {{dataset: calib_data/gpl-3.txt, num_samples: 2, seq_len: 32, seed: 0}}
quantization:
  schemes:
    - targets: [Linear]
      weights: {{format: {fmt}, granularity: {granularity}{group}}}
stages:
  - rtn: {{}}
eval:
  dataset: calib_data/heldout/mpl-2.0.txt
  context_len: 64
  stride: 32
  max_tokens: 384
  gates: {gates}
"""


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the default model's tokenizer, saved like any HF checkpoint."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("orig") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_checkpoint(root: Path, original: Path, name: str, fmt: str, granularity: str, gates: str) -> Path:
    """Calibrate ``original`` with a one-stage RTN recipe and write the checkpoint ``root/name``."""
    recipe_file = root / f"{name}.yaml"
    group = ", group_size: 32" if granularity == "group" else ""
    recipe_file.write_text(RECIPE.format(model=original, output=root / name, fmt=fmt, granularity=granularity,
                                         group=group, gates=gates))
    recipe = load_recipe(recipe_file)
    model, tokenizer = load_model(recipe.model, torch.float32)
    calib = build_calibration_set(recipe.calibration, tokenizer, model)
    result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
    write_checkpoint(model, tokenizer, recipe, calib, result, recipe.output)
    return Path(recipe.output)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny_original) -> dict[str, Path]:
    """``int8``: INT8 per channel with lax gates (they pass); ``int4``: INT4 in groups of 32 with a KL
    gate of 0, which any rounding fails."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "int8": make_checkpoint(root, tiny_original, "tiny-int8", "int8", "channel",
                                "{max_ppl_increase_pct: 50, max_kl: 1.0, min_top1_agreement: 0.5}"),
        "int4": make_checkpoint(root, tiny_original, "tiny-int4", "int4", "group", "{max_ppl_increase_pct: 50, max_kl: 0}"),
    }


@pytest.fixture(autouse=True)
def private_eval_cache(tmp_path_factory, monkeypatch):
    """Each test's original-model results go to its own cache, never to the user's."""
    root = tmp_path_factory.mktemp("eval-cache")
    monkeypatch.setattr("quantlab.evaluation.run.cache_root", lambda: root)
    return root
