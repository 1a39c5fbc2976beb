"""The schema's inverses are exact: ranges rebuilt from stored scales give back those scales bit for bit,
and formats compressed-tensors cannot express are refused before anything is written."""

import pytest
import torch

from quantlab import formats
from quantlab.checkpoint import schema
from quantlab.errors import CheckpointError
from quantlab.fake_quant import KVCacheQuant, QuantLinear
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, WeightScheme


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal on two aliases of one float8 tensor is not implemented on CPU)."""
    bits = (lambda t: t.view(torch.uint8)) if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else (lambda t: t)
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def _amaxes(n: int, seed: int = 0) -> torch.Tensor:
    """Positive float32 ranges spread over ten decades."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n).uniform_(-16.0, 7.0, generator=g)).float()


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_kv_ranges_rebuilt_from_stored_scales_reproduce_them(granularity):
    amax = _amaxes(4000)
    kv = KVCacheQuant(KVCacheScheme(granularity=granularity))
    if granularity == "head":
        kv.k_amax, kv.v_amax = amax, amax.flip(0)
        stored = schema.kv_tensors(kv)
        assert stored["k_scale"].shape == (4000, 1, 1)
        loaded = KVCacheQuant(kv.scheme)
        schema.load_kv_state(loaded, stored)
        assert all(torch.equal(a, b) for a, b in zip(kv.scales(), loaded.scales()))
    else:
        for a in amax[:300]:
            kv.k_amax = kv.v_amax = a.reshape(1)
            loaded = KVCacheQuant(kv.scheme)
            schema.load_kv_state(loaded, schema.kv_tensors(kv))
            assert torch.equal(kv.scales()[0], loaded.scales()[0])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "nvfp4"])
def test_input_ranges_rebuilt_from_stored_scales_reproduce_them(fmt):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    weights = WeightScheme(fmt, "group", 16) if fmt == "nvfp4" else WeightScheme(fmt, "channel")
    act = ActivationScheme(fmt, "group", True) if fmt == "nvfp4" else ActivationScheme(fmt, "tensor", False)
    q = formats.quantize(w, fmt, group_size=16) if fmt == "nvfp4" else formats.quantize(w, fmt)
    scheme = {"weights": schema.weight_args(weights), "input_activations": schema.activation_args(act)}
    for a in _amaxes(300, seed=2):
        module = QuantLinear(q, None, act, a, torch.float32)
        stored = schema.compress_linear("m", module)
        qweight, act2, amax2 = schema.decompress_linear("m", stored, scheme)
        again = schema.compress_linear("m", QuantLinear(qweight, None, act2, amax2, torch.float32))
        assert stored.keys() == again.keys() and all(_same(stored[k], again[k]) for k in stored), float(a)


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
