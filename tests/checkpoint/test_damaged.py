"""Damaged or wrong input is found before any tensor is trusted: one sentence naming the file, from the
loader, the streaming reader, ``inspect`` and the CLI alike."""

import struct

import pytest
from typer.testing import CliRunner

from quantlab.checkpoint.digest import file_sha256
from quantlab.checkpoint.inspect import inspect_checkpoint
from quantlab.checkpoint.reader import load_quantized
from quantlab.checkpoint.stream import open_checkpoint
from quantlab.checkpoint.writer import write_checkpoint
from quantlab.cli import app
from quantlab.errors import CheckpointError
from quantlab.recipe.schema import SchemeGroup, WeightScheme

READERS = {"load_quantized": load_quantized, "open_checkpoint": open_checkpoint, "inspect": inspect_checkpoint}


@pytest.fixture
def ckpt(quantize, tmp_path):
    c = quantize([SchemeGroup(("Linear",), WeightScheme("int8", "channel"))])
    return write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt").path


def test_quantlab_json_records_each_shards_sha256(ckpt):
    import json

    shards = json.loads((ckpt / "quantlab.json").read_text())["shards"]
    assert shards == {"model.safetensors": file_sha256(ckpt / "model.safetensors")}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("length", [2**62, 2**40, 10**9])
def test_corrupt_header_length_is_one_sentence(ckpt, reader, length):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", length)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        READERS[reader](ckpt)
    assert str(e.value) == (f"{f} is not a readable safetensors file (its header length field says {length} bytes "
                            f"but the file has {len(data)}: the file is damaged)")


def test_flipped_tensor_byte_is_named_by_the_loader(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data, past the header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_quantized(ckpt)
    assert str(e.value).startswith(f"{f} does not match the SHA-256 recorded in {ckpt / 'quantlab.json'}")
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        open_checkpoint(ckpt).verify()


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# hello\n")
    result = CliRunner().invoke(app, ["inspect", str(readme)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {readme} is not a checkpoint directory (a checkpoint is a "
                                                  "directory holding config.json, model.safetensors and quantlab.json)"]


def test_corrupt_header_through_the_cli_is_one_line(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    f.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "the file is damaged" in result.output
