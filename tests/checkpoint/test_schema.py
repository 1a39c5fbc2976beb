"""The schema's translations are exact: what a module holds is what is stored and read back, bit for bit,
and formats compressed-tensors cannot express are refused before anything is written."""

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint import schema
from quantlab.errors import CheckpointError
from quantlab.fake_quant import QuantLinear, activation_scales
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, WeightScheme


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal on two aliases of one float8 tensor is not implemented on CPU)."""
    bits = (lambda t: t.view(torch.uint8)) if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else (lambda t: t)
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "nvfp4"])
def test_linear_tensors_written_and_read_back_are_bit_identical(fmt):
    """compress_linear then decompress_weight is the identity on codes and scales, and the input scales
    a module holds are stored as they are."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    weights = WeightScheme(fmt, "group", 16) if fmt == "nvfp4" else WeightScheme(fmt, "channel")
    act = ActivationScheme(fmt, "group", True) if fmt == "nvfp4" else ActivationScheme(fmt, "tensor", False)
    q = formats.quantize(w, fmt, group_size=16) if fmt == "nvfp4" else formats.quantize(w, fmt)
    scheme = {"weights": schema.weight_args(weights), "input_activations": schema.activation_args(act)}
    scales = activation_scales(act, torch.tensor(2.5))
    stored = schema.compress_linear("m", QuantLinear(q, None, act, torch.float32, *scales))
    back = schema.decompress_weight("m", stored, scheme)
    assert all(_same(getattr(q, k), getattr(back, k)) for k in ("codes", "scale"))
    name = "input_global_scale" if fmt == "nvfp4" else "input_scale"
    assert _same(stored[name], scales[1] if fmt == "nvfp4" else scales[0])


def test_static_activations_without_a_scale_are_refused():
    q = formats.quantize(torch.randn(16, 32), "int8")
    with pytest.raises(CheckpointError, match="no calibrated input_scale"):
        schema.compress_linear("m", QuantLinear(q, None, ActivationScheme("int8", "tensor", False), torch.float32))


@pytest.mark.parametrize("bad", [lambda: schema.weight_args(WeightScheme("fp8_e5m2", "channel")),
                                 lambda: schema.activation_args(ActivationScheme("fp8_e5m2", "token", True)),
                                 lambda: schema.kv_cache_args(KVCacheScheme("fp8_e5m2"))])
def test_formats_without_a_compressed_tensors_equivalent_are_refused(bad):
    with pytest.raises(CheckpointError, match="fp8_e5m2 has no compressed-tensors equivalent"):
        bad()


def test_e5m2_recipe_writes_nothing(quantize, tmp_path):
    from quantlab.checkpoint.writer import write_checkpoint
    from quantlab.recipe.schema import SchemeGroup

    c = quantize([SchemeGroup(("Linear",), WeightScheme("fp8_e5m2", "channel"))])
    with pytest.raises(CheckpointError, match="fp8_e5m2"):
        write_checkpoint(c.model, c.tokenizer, c.recipe, c.calib, c.result, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
