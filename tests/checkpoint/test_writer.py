"""Writing is atomic: an existing output is refused or replaced only once the new checkpoint is complete,
and a failure part-way leaves neither an output nor a temporary directory behind."""

import json

import pytest
import safetensors.torch

from quantlab.checkpoint.writer import write_checkpoint
from quantlab.errors import CheckpointError
from quantlab.recipe.schema import SchemeGroup, WeightScheme

INT4 = [SchemeGroup(("Linear",), WeightScheme("int4_asym", "group", 32))]


def _write(c, out, **kw):
    return write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, out, **kw)


def test_existing_output_is_refused_with_one_sentence(quantize, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError) as e:
        _write(quantize(INT4), out)
    assert str(e.value) == f"{out} exists; pass --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_replaces_the_old_checkpoint_completely(quantize, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    summary = _write(quantize(INT4), out, overwrite=True)
    assert not (out / "stale.safetensors").exists()
    assert set(summary.files) == {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "quantlab.json", "tokenizer.json"} <= set(summary.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_output_and_no_temp_dir(existing, quantize, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second shard: one finished shard already sits in the temp dir
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _write(quantize(INT4), out, overwrite=True, max_shard_bytes=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if existing else [])
    if existing:  # the old checkpoint is untouched
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_quantlab_json_records_provenance(quantize, tmp_path):
    c = quantize(INT4)
    _write(c, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "quantlab.json").read_text())
    assert meta["recipe"] == {"path": c.recipe.path, "sha256": c.recipe.sha256, "text": c.recipe.text}
    assert meta["model"] == {"name": c.recipe.model, "path": c.recipe.model}
    assert meta["calibration"] == {"source": "test", "digest": c.calib.digest, "num_samples": 4, "seq_len": 16,
                                   "seed": 0}
    assert [layer["name"] for layer in meta["layers"]] == ["model.layers.0", "model.layers.1"]
    assert set(meta["layers"][0]) == {"name", "rel_mse", "seconds", "peak_mem_mib"}
    assert meta["quantlab_version"] and meta["torch_version"] and meta["transformers_version"]
    assert meta["created"].endswith("+00:00") and meta["calibration_seconds"] > 0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
