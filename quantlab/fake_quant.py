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


def activation_scales(act: ActivationScheme | None,
                      input_amax: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(``input_scale``, ``input_global_scale``) for a calibrated input range, as the checkpoint stores them.

    A static per-tensor int8/fp8 scheme gets ``input_scale`` (float32 [1]); nvfp4 activations, dynamic per
    block, get their calibrated global scale (float32 [1]); any other scheme needs neither. Both come
    from ``formats.qparams``, the formula the forward pass would apply to the range.
    """
    if act is None or input_amax is None:
        return None, None
    a = input_amax.detach().float().reshape(1)
    if act.format == "nvfp4":
        return None, formats.qparams(act.format, -a, a, global_amax=a).global_scale.float().reshape(1)
    if act.granularity == "tensor" and not act.dynamic:
        return formats.qparams(act.format, -a, a).scale.float().reshape(1), None
    return None, None


def activation_kwargs(act: ActivationScheme, input_scale: torch.Tensor | None = None,
                      input_global_scale: torch.Tensor | None = None) -> dict:
    """``formats.quantize`` keywords that reproduce what a kernel does to a Linear's input.

    per-token dynamic: one scale per row; per-tensor: one scale, the stored ``input_scale`` when static;
    fp4 groups: dynamic per block, nvfp4's global scale the stored ``input_global_scale``.
    """
    if act.granularity == "token":
        return {}
    if act.granularity == "tensor":
        return {"per_tensor": True} if act.dynamic else {"per_tensor": True, "scale": input_scale}
    if act.format == "nvfp4":
        return {"global_scale": input_global_scale}
    return {}


class QuantLinear(nn.Module):
    """A Linear computing ``F.linear(Q_act(x), dequant(W_q), b)``.

    Only the codes and scales are held, and the weight is decoded on every forward, except inside
    ``decoded_weights``: a dense copy kept beside the codes would cost 2-4 bytes per weight for the
    whole model while calibration moves on layer by layer, against the codes' one byte.

    Every tensor the checkpoint stores for the Linear is held as stored, so writing and reading a
    checkpoint are plain translations (``quantlab.checkpoint.schema``).

    Attributes:
        qweight: the quantized weight (codes and scales) exactly as the checkpoint stores it.
        act: the input-activation scheme, or None for weight-only.
        input_scale: static per-tensor int8/fp8 activations' scale (float32 [1]), else None.
        input_global_scale: nvfp4 activations' calibrated global scale (float32 [1]), else None.
    ``to()`` moves the stored tensors to another device but never changes their dtypes.
    """

    def __init__(self, qweight: formats.QTensor, bias: torch.Tensor | None, act: ActivationScheme | None,
                 dtype: torch.dtype, input_scale: torch.Tensor | None = None,
                 input_global_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.act = act
        self.input_scale = None if input_scale is None else input_scale.detach().float().reshape(1)
        self.input_global_scale = None if input_global_scale is None else input_global_scale.detach().float().reshape(1)
        # Follows .to() like any buffer, so it carries the device and compute dtype the weight decodes to.
        self.register_buffer("_compute", torch.empty(0, dtype=dtype, device=qweight.codes.device), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self._decoded: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the compute dtype (decoded on each access outside ``decoded_weights``)."""
        if self._decoded is not None:
            return self._decoded
        return formats.dequantize(self.qweight, self._compute.dtype)

    def _apply(self, fn, recurse=True):
        # The codes and scales are not buffers, so .to(dtype) cannot re-round them (a bf16 scale cast to
        # fp16 would change, an fp32 input scale cast to bf16 too); they follow device moves only.
        super()._apply(fn, recurse)
        if self._decoded is not None:
            self._decoded = fn(self._decoded)
        device = self._compute.device
        q = self.qweight
        self.qweight = dataclasses.replace(
            q, codes=q.codes.to(device), scale=q.scale.to(device),
            zero_point=None if q.zero_point is None else q.zero_point.to(device),
            global_scale=None if q.global_scale is None else q.global_scale.to(device))
        self.input_scale = None if self.input_scale is None else self.input_scale.to(device)
        self.input_global_scale = None if self.input_global_scale is None else self.input_global_scale.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            kwargs = activation_kwargs(self.act, self.input_scale, self.input_global_scale)
            x = formats.quantize_dequantize(x, self.act.format, **kwargs)
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
    through the cache format with the k/v scales the checkpoint stores.

    Keys are seen after RoPE, exactly what a paged cache stores, as [batch, kv_heads, tokens, head_dim].
    Scales follow vLLM: ``k_scale = amax / fmax`` (per tensor: shape [1]; per head: [kv_heads]), computed
    by ``formats`` once observation ends (``set_scales_from_observed``). Like a ``QuantLinear``'s, the
    scales are plain attributes, so a model's ``.to(dtype)`` never re-rounds them.
    """

    def __init__(self, scheme: KVCacheScheme, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
        super().__init__()
        self.scheme = scheme
        self.observing = False
        self.k_scale = None if k_scale is None else k_scale.detach().float().reshape(-1)
        self.v_scale = None if v_scale is None else v_scale.detach().float().reshape(-1)
        self._amax: dict[str, torch.Tensor] = {}

    def _observe(self, name: str, t: torch.Tensor) -> None:
        a = t.detach().abs().float()
        amax = a.amax(dim=(0, 2, 3)) if self.scheme.granularity == "head" else a.amax().reshape(1)
        old = self._amax.get(name)
        self._amax[name] = amax if old is None else torch.maximum(old, amax)

    def set_scales_from_observed(self) -> None:
        """Turn the observed key/value ranges into ``k_scale``/``v_scale`` (float32) and forget them."""
        for name in ("k", "v"):
            amax = self._amax.pop(name, None)
            if amax is not None:
                setattr(self, f"{name}_scale", formats.qparams(self.scheme.format, -amax, amax).scale.float())

    def _round(self, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(t.device)
        s = s.reshape(1, -1, 1, 1) if s.numel() > 1 else s
        return formats.fake_quantize(t, formats.QParams(self.scheme.format, s))

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observing:
            self._observe("k", key)
            self._observe("v", value)
            return key, value
        if self.k_scale is None or self.v_scale is None:
            return key, value
        return self._round(key, self.k_scale), self._round(value, self.v_scale)


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
