"""A tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256, tied embeddings like
SmolLM2), a WordLevel tokenizer, and a helper that calibrates it with RTN under a list of scheme groups."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from quantlab.algorithms import RTNParams
from quantlab.data import CalibrationSet, digest
from quantlab.pipeline import CalibrationResult, calibrate
from quantlab.recipe.schema import CalibrationConfig, KVCacheScheme, Recipe, SchemeGroup, Stage


@dataclass
class Calibrated:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    calib: CalibrationSet
    result: CalibrationResult
    ids: torch.Tensor

    def logits(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.no_grad():
            return (model or self.model)(self.ids).logits


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def quantize(tiny_dir):
    """quantize(groups, kv=None, export_dtype="float32", ignore=("lm_head",)) -> Calibrated."""
    from quantlab.models import load_model

    def run(groups: list[SchemeGroup], kv: KVCacheScheme | None = None, export_dtype: str = "float32",
            ignore: tuple[str, ...] = ("lm_head",)) -> Calibrated:
        model, tokenizer = load_model(str(tiny_dir))
        recipe = Recipe(path="tests/tiny.yaml", text="# tiny test recipe\n", sha256="0" * 64, model=str(tiny_dir),
                        output="unused", calibration=CalibrationConfig(num_samples=4, seq_len=16, seed=0),
                        schemes=tuple(groups), stages=(Stage("rtn", RTNParams()),), ignore=ignore, kv_cache=kv,
                        export_dtype=export_dtype)
        ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
        calib = CalibrationSet(ids, "test", digest(ids))
        result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
        return Calibrated(model, tokenizer, recipe, calib, result, ids)

    return run
