"""Simulated quantization on the CPU (or any device): a Linear whose weight is its quantized value and
whose input is quantized the way the serving kernel will quantize it, and an attention function that
rounds keys and values through the FP8 KV-cache format.

The calibration pipeline swaps these in layer by layer (so each layer sees its predecessors' quantized
outputs), the checkpoint reader rebuilds them from a checkpoint, and evaluation runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .recipe.schema import ActivationScheme, KVCacheScheme


def activation_kwargs(act: ActivationScheme, input_amax: torch.Tensor | None) -> dict:
    """``formats.quantize`` keywords that reproduce what a kernel does to a Linear's input.

    per-token dynamic: one scale per row; per-tensor: one scale, from ``input_amax`` when static;
    fp4 groups: dynamic per block, nvfp4's global scale from the calibrated ``input_amax``.
    """
    if act.granularity == "token":
        return {}
    if act.granularity == "tensor":
        return {"per_tensor": True} if act.dynamic else {"per_tensor": True, "amax": input_amax}
    if act.format == "nvfp4":
        return {"global_amax": input_amax}
    return {}


class QuantLinear(nn.Module):
    """A Linear computing ``F.linear(Q_act(x), dequant(W_q), b)``.

    Only the codes and scales are held, and the weight is decoded on every forward, except inside
    ``decoded_weights``: a dense copy kept beside the codes would cost 2-4 bytes per weight for the
    whole model while calibration moves on layer by layer, against the codes' one byte.

    Attributes:
        qweight: the quantized weight (codes and scales) exactly as the checkpoint stores it. ``to()``
            moves it to another device but never changes its dtypes.
        act: the input-activation scheme, or None for weight-only.
        input_amax: calibrated input range (float32 scalar) for static per-tensor activations and for
            nvfp4's activation global scale; None otherwise.
    """

    def __init__(self, qweight: formats.QTensor, bias: torch.Tensor | None, act: ActivationScheme | None,
                 input_amax: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.act = act
        # Follows .to() like any buffer, so it carries the device and compute dtype the weight decodes to.
        self.register_buffer("_compute", torch.empty(0, dtype=dtype, device=qweight.codes.device), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.register_buffer("input_amax", None if input_amax is None else input_amax.detach().float().reshape(1))
        self._decoded: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the compute dtype (decoded on each access outside ``decoded_weights``)."""
        if self._decoded is not None:
            return self._decoded
        return formats.dequantize(self.qweight, self._compute.dtype)

    def _apply(self, fn, recurse=True):
        # The codes and scales are not buffers, so .to(dtype) cannot re-round them (a bf16 scale cast to
        # fp16 would change); they follow device moves only.
        super()._apply(fn, recurse)
        if self._decoded is not None:
            self._decoded = fn(self._decoded)
        device = self._compute.device
        q = self.qweight
        self.qweight = dataclasses.replace(
            q, codes=q.codes.to(device), scale=q.scale.to(device),
            zero_point=None if q.zero_point is None else q.zero_point.to(device),
            global_scale=None if q.global_scale is None else q.global_scale.to(device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = formats.quantize_dequantize(x, self.act.format, **activation_kwargs(self.act, self.input_amax))
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        act = "none" if self.act is None else f"{self.act.format}/{self.act.granularity}"
        return f"in={self.in_features}, out={self.out_features}, weight={self.qweight.fmt}, act={act}"


@contextlib.contextmanager
def decoded_weights(module: nn.Module):
    """Within the block, every ``QuantLinear`` under ``module`` reuses one decoded copy of its weight.

    For repeated forwards (a layer's pass over the calibration batches, evaluation), where decoding on
    every forward would add up (NVFP4's table lookups most). The copies are dropped on exit.
    """
    linears = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for m in linears:
        m._decoded = m.weight
    try:
        yield module
    finally:
        for m in linears:
            m._decoded = None


# --- FP8 KV cache ------------------------------------------------------------------------------------

KV_ATTENTION = "quantlab_kv"


class KVCacheQuant(nn.Module):
    """Per-attention-module KV-cache state: observes key/value ranges during calibration, or rounds them
    through the cache format during evaluation.

    Keys are seen after RoPE, exactly what a paged cache stores, as [batch, kv_heads, tokens, head_dim].
    Scales follow vLLM: ``k_scale = amax / fmax`` (per tensor: shape [1]; per head: [kv_heads]).
    """

    def __init__(self, scheme: KVCacheScheme):
        super().__init__()
        self.scheme = scheme
        self.observing = False
        self.register_buffer("k_amax", None)
        self.register_buffer("v_amax", None)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        a = t.detach().abs().float()
        return a.amax(dim=(0, 2, 3)) if self.scheme.granularity == "head" else a.amax().reshape(1)

    def _observe(self, name: str, t: torch.Tensor) -> None:
        amax = self._reduce(t)
        old = getattr(self, name)
        setattr(self, name, amax if old is None else torch.maximum(old, amax))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (k_scale, v_scale) as the checkpoint stores them."""
        fmax = formats.get_spec(self.scheme.format).qmax
        tiny = torch.finfo(torch.float32).tiny
        return (self.k_amax / fmax).clamp(min=tiny), (self.v_amax / fmax).clamp(min=tiny)

    def _round(self, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        spec = formats.get_spec(self.scheme.format)
        s = scale.to(t.device).reshape(1, -1, 1, 1) if scale.numel() > 1 else scale.to(t.device)
        return (formats.fp8.cast_saturating(t.float() / s, spec.element_dtype).float() * s).to(t.dtype)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observing:
            self._observe("k_amax", key)
            self._observe("v_amax", value)
            return key, value
        if self.k_amax is None:
            return key, value
        k_scale, v_scale = self.scales()
        return self._round(key, k_scale), self._round(value, v_scale)


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "kv_quant", None)
    if kv is not None:
        key, value = kv(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable_kv_quant(model: nn.Module, scheme: KVCacheScheme) -> list[KVCacheQuant]:
    """Attach a ``KVCacheQuant`` to every attention module and route attention through it."""
    from transformers import AttentionInterface

    AttentionInterface.register(KV_ATTENTION, _kv_attention)
    states = []
    for module in model.modules():
        if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            module.kv_quant = KVCacheQuant(scheme)
            states.append(module.kv_quant)
    model.set_attn_implementation(KV_ATTENTION)
    return states
