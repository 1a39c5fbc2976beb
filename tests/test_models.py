"""Model names resolve without the network: the built-in default, a local directory, a hub id found in
the Hugging Face cache; anything else fails at once with one sentence naming the built-in models."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from quantlab import models
from quantlab.errors import CheckpointError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.delenv(models.ALLOW_HUB_ENV, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


@pytest.fixture
def tiny_dir(tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tiny"
    tiny_llama(hidden=32, layers=1).save_pretrained(path)
    tok = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return path


def test_unknown_model_id_fails_at_once_listing_built_in_names(offline):
    with pytest.raises(CheckpointError) as e:
        models.resolve_model("someone/no-such-model")
    assert str(e.value) == ("model 'someone/no-such-model' is neither a local directory nor a built-in model "
                            "(smollm2-135m) nor in the Hugging Face cache; set QUANTLAB_ALLOW_HUB=1 to download "
                            "it from the hub")


def test_hub_id_in_the_hugging_face_cache_resolves_offline(offline):
    repo = offline / "models--someone--cached-model"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert models.resolve_model("someone/cached-model") == "someone/cached-model"


def test_hub_id_is_passed_on_only_when_the_hub_is_allowed(offline, monkeypatch):
    monkeypatch.setenv(models.ALLOW_HUB_ENV, "1")
    assert models.resolve_model("someone/no-such-model") == "someone/no-such-model"


def test_missing_local_path_and_directory_without_config_are_named(tmp_path, offline):
    with pytest.raises(CheckpointError, match=f"model path {tmp_path / 'nope'} does not exist"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=f"model directory {tmp_path} has no config.json"):
        models.resolve_model(str(tmp_path))


def test_local_directory_loads_in_eval_mode_in_the_asked_dtype(tiny_dir, offline):
    assert models.resolve_model(str(tiny_dir)) == str(tiny_dir)
    model, tokenizer = models.load_model(str(tiny_dir), torch.bfloat16)
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert len(models.decoder_layers(model)) == 1
    assert tokenizer("t3 t4")["input_ids"] == [3, 4]


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(CheckpointError, match="Sequential has no model.layers"):
        models.decoder_layers(torch.nn.Sequential())


def test_cache_dir_follows_quantlab_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "q"))
    assert models.cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QUANTLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "quantlab"


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert models.torch_dtype("auto", "cpu") == torch.float32
    assert models.torch_dtype("auto", "cuda") == torch.bfloat16
    assert models.torch_dtype("float16", "cpu") == torch.float16
