"""Linear layers of every format the engine serves: build-time packing and the run-time product.

``pack`` runs at ``quantlab build`` and turns a checkpoint's Linear (a float weight, or a
``StoredLinear`` from ``quantlab.checkpoint.stream``) into a ``LinearSpec`` (saved in engine.json) and the
tensors its kernel reads (saved in the engine's safetensors). ``apply`` computes ``y = Q_act(x) @ W^T + b``
from them. The reference path decodes the weight with ``quantlab.formats`` and rounds the activations
exactly as ``quantlab.fake_quant.QuantLinear`` does, so the engine and the checkpoint's simulated model
agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear


@dataclass(frozen=True)
class LinearSpec:
    """What a linear layer's kernel needs besides its tensors (one entry of engine.json).

    Attributes:
        kind: ``"dense"`` (unquantized), ``"w4a16"`` (int4/int4_asym/nvfp4/mxfp4 weight-only),
            ``"w8a8_fp8"``, ``"w8a8_int8"``, or ``"fake"`` (any other combination, run by the reference).
        weight_format: the weight's ``quantlab.formats`` name, or None for dense.
        in_features, out_features: the product's shape.
        group_size: weight group/block length, or None.
        per_tensor: one weight scale for the whole tensor.
        act_format, act_granularity, act_dynamic: the input-activation scheme, or None for weight-only.
        has_bias: whether a ``bias`` tensor is stored.
    """

    kind: str
    weight_format: str | None
    in_features: int
    out_features: int
    group_size: int | None = None
    per_tensor: bool = False
    act_format: str | None = None
    act_granularity: str | None = None
    act_dynamic: bool = True
    has_bias: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LinearSpec":
        return cls(**d)


def _kind(stored: StoredLinear) -> str:
    fmt, act = stored.qweight.fmt, stored.act
    if act is None and fmt in ("int4", "int4_asym", "nvfp4", "mxfp4"):
        return "w4a16"
    if act is not None and act.format == fmt == "fp8_e4m3":
        return "w8a8_fp8"
    if act is not None and act.format == fmt == "int8":
        return "w8a8_int8"
    return "fake"


def pack(weight: torch.Tensor | StoredLinear, dtype: torch.dtype,
         bias: torch.Tensor | None = None) -> tuple[LinearSpec, dict[str, torch.Tensor]]:
    """Lay one Linear out for its kernel (build time only).

    Args:
        weight: a float weight [out, in] (dense) or a quantized ``StoredLinear``.
        dtype: compute dtype of the engine (dense weights and biases are cast to it).
        bias: the bias of a dense Linear (a StoredLinear carries its own).

    Returns:
        (spec, tensors): tensors by local name, contiguous, on the CPU.
    """
    if isinstance(weight, torch.Tensor):
        out_f, in_f = weight.shape
        tensors = {"weight": weight.to(dtype)}
        if bias is not None:
            tensors["bias"] = bias.to(dtype)
        return LinearSpec("dense", None, in_f, out_f, has_bias=bias is not None), _contiguous(tensors)
    q, act = weight.qweight, weight.act
    out_f, in_f = q.shape
    tensors = {"codes": q.codes, "scale": q.scale}
    for name, t in (("zero_point", q.zero_point), ("global_scale", q.global_scale),
                    ("input_scale", weight.input_scale), ("input_global_scale", weight.input_global_scale)):
        if t is not None:
            tensors[name] = t
    if weight.bias is not None:
        tensors["bias"] = weight.bias.to(dtype)
    spec = LinearSpec(_kind(weight), q.fmt, in_f, out_f, q.group_size, q.per_tensor,
                      None if act is None else act.format, None if act is None else act.granularity,
                      True if act is None else act.dynamic, weight.bias is not None)
    return spec, _contiguous(tensors)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def quantize_activation_ref(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x`` rounded through the layer's activation format (simulated; ``x``'s dtype)."""
    fmt = spec.act_format
    if spec.act_granularity == "token":
        return formats.quantize_dequantize(x, fmt)
    if spec.act_granularity == "tensor" and not spec.act_dynamic:
        return formats.fake_quantize(x, formats.QParams(fmt, tensors["input_scale"]))
    if spec.act_granularity == "tensor":
        return formats.quantize_dequantize(x, fmt, per_tensor=True)
    return formats.quantize_dequantize(x, fmt, global_scale=tensors.get("input_global_scale"))


def dequantize_weight_ref(spec: LinearSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [out, in] in ``dtype``."""
    if spec.kind == "dense":
        return tensors["weight"].to(dtype)
    q = formats.QTensor(spec.weight_format, tensors["codes"], tensors["scale"], tensors.get("zero_point"),
                        tensors.get("global_scale"), spec.group_size, spec.per_tensor)
    return formats.dequantize(q, dtype)


def linear_ref(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference ``Q_act(x) @ dequant(W)^T + b`` in ``x``'s dtype. x: [tokens, in] -> [tokens, out]."""
    if spec.act_format is not None:
        x = quantize_activation_ref(x, spec, tensors)
    return F.linear(x, dequantize_weight_ref(spec, tensors, x.dtype), tensors.get("bias"))


def apply(x: torch.Tensor, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's product: the fastest kernel for ``spec`` on CUDA, the reference elsewhere."""
    if spec.kind == "dense":
        return F.linear(x, tensors["weight"], tensors.get("bias"))
    return linear_ref(x, spec, tensors)
