"""inspect's byte counts match first principles: 4-bit codes plus a BF16 scale (and a 4-bit zero point)
per group, over 16 bits per BF16 weight."""

import pytest

from quantlab.checkpoint.inspect import format_report, inspect_checkpoint
from quantlab.checkpoint.writer import write_checkpoint
from quantlab.errors import CheckpointError
from quantlab.recipe.schema import SchemeGroup, WeightScheme

# (out, in) of the tiny Llama's Linears, per layer.
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]


def _expected_bytes(out: int, inp: int, group: int, asym: bool) -> int:
    groups = inp // group
    return out * inp // 2 + out * groups * 2 + (out // 8 * groups * 4 if asym else 0) + 2 * 8  # + weight_shape int64[2]


@pytest.mark.parametrize("fmt", ["int4", "int4_asym"])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_ratio_matches_first_principles(fmt, group, quantize, tmp_path):
    c = quantize([SchemeGroup(("Linear",), WeightScheme(fmt, "group", group))], export_dtype="bfloat16")
    summary = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    report = inspect_checkpoint(summary.path)
    asym = fmt == "int4_asym"
    assert [(m.stored_bytes, m.bf16_bytes) for m in report.modules] == \
        [(_expected_bytes(o, i, group, asym), o * i * 2) for o, i in SHAPES * 2]
    bits = 4 + 16 / group + (4 / group if asym else 0)  # per weight: code, bf16 scale, packed zero point
    overhead = 16 * len(report.modules) / report.quantized_bf16  # weight_shape per module
    assert report.quantized_ratio == pytest.approx(bits / 16 + overhead, rel=1e-12)
    if (fmt, group) == ("int4_asym", 64):
        assert bits / 16 == 0.26953125 and 0.265 < report.quantized_ratio < 0.29  # ~0.27 of BF16
    assert report.total_stored == summary.bytes
    params = c.model.config.vocab_size * 64 + 2 * (2 * 64) + 64 + sum(o * i for o, i in SHAPES) * 2
    assert report.total_bf16 == params * 2  # tied embeddings counted once
    assert all(m.format == fmt and m.scheme.startswith(f"group {group}") for m in report.modules)


def test_report_lists_modules_and_totals(quantize, tmp_path):
    from quantlab.recipe.schema import ActivationScheme, KVCacheScheme

    fp8 = SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "tensor"), ActivationScheme("fp8_e4m3", "tensor", False))
    c = quantize([fp8], KVCacheScheme())
    write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    text = format_report(inspect_checkpoint(tmp_path / "ckpt"))
    assert "model.layers.1.mlp.down_proj" in text and "tensor, act fp8_e4m3 tensor static" in text
    assert "quantized linear weights:" in text and "whole checkpoint:" in text
    assert "kv cache: fp8_e4m3 per tensor" in text


def test_truncated_shard_is_reported(quantize, tmp_path):
    c = quantize([SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))])
    path = write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt").path
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file \(it is truncated"):
        inspect_checkpoint(path)
