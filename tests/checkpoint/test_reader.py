"""A missing or damaged checkpoint file is reported as one CheckpointError naming that file."""

import json
import re

import pytest

from quantlab.checkpoint.reader import load_quantized
from quantlab.checkpoint.writer import write_checkpoint
from quantlab.errors import CheckpointError
from quantlab.recipe.schema import SchemeGroup, WeightScheme


@pytest.fixture
def ckpt(quantize, tmp_path):
    c = quantize([SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))])
    return write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt").path


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_quantized(path)
    return str(e.value)


def test_missing_config_json_is_named(ckpt):
    (ckpt / "config.json").unlink()
    assert _error(ckpt) == f"{ckpt / 'config.json'} is missing"


def test_config_without_quantization_config_is_named(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert _error(ckpt) == f"{ckpt / 'config.json'} has no quantization_config"


def test_corrupt_config_json_is_named(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert _error(ckpt).startswith(f"{ckpt / 'config.json'} is not valid JSON")


def test_missing_quantlab_json_is_named(ckpt):
    (ckpt / "quantlab.json").unlink()
    assert _error(ckpt) == f"{ckpt / 'quantlab.json'} is missing"


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_is_named(ckpt, keep):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    assert re.fullmatch(re.escape(f"{f} is not a readable safetensors file (") + r".+\)", _error(ckpt))


def test_missing_safetensors_is_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert _error(ckpt) == f"{ckpt / 'model.safetensors'} is missing"


def test_missing_directory_is_one_sentence(tmp_path):
    assert _error(tmp_path / "nope") == f"checkpoint directory {tmp_path / 'nope'} does not exist"


def test_missing_tokenizer_is_one_sentence(ckpt):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    assert _error(ckpt).startswith(f"{ckpt} has no loadable tokenizer (")
