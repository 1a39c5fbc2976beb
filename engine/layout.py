"""Fusing q/k/v and gate/up into one projection at build time, where the stored format allows it.

The parts are concatenated along the output features *before* ``kernels.linear.pack`` sees them, so the
kernel's own layout (transposed, nibble-packed, ...) is made once, from one weight, and stays valid
whatever ``pack`` does. That needs every part's per-row tensors (codes, group/channel scales, zero points,
biases) to stack and every part's whole-tensor numbers to agree: one scale for the whole fused tensor
must be *the* scale of each part, because requantizing a calibrated checkpoint is not allowed (it would no
longer be the checkpoint that passed evaluation). So a per-tensor FP8/INT8 weight scale, an NVFP4 global
scale or a static input scale that differs between parts keeps the projection unfused: its parts are
stored and applied separately, and engine.json's ``fusion`` says why.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear

Part = tuple[torch.Tensor | StoredLinear, torch.Tensor | None]  # (float weight or StoredLinear, float bias)


def _same(tensors: list[torch.Tensor | None]) -> bool:
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and t.shape == first.shape and torch.equal(t, first) for t in tensors)


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors, dim=0)


def fuse(parts: list[Part]) -> tuple[Part | None, str]:
    """One part equal to the parts stacked along output features, or (None, why not)."""
    weights, biases = [w for w, _ in parts], [b for _, b in parts]
    if all(isinstance(w, torch.Tensor) for w in weights):
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None, "only some parts have a bias"
        return (torch.cat(weights, dim=0), _cat(biases)), ""
    if not all(isinstance(w, StoredLinear) for w in weights):
        return None, "some parts are quantized and some are not"
    first = weights[0]
    q0 = first.qweight
    if any((w.qweight.fmt, w.qweight.group_size, w.qweight.per_tensor, w.act) !=
           (q0.fmt, q0.group_size, q0.per_tensor, first.act) for w in weights):
        return None, "the parts have different schemes"
    qs = [w.qweight for w in weights]
    for what, values in (("input scales", [w.input_scale for w in weights]),
                         ("input global scales", [w.input_global_scale for w in weights]),
                         ("global scales", [q.global_scale for q in qs])):
        if not _same(values):
            return None, f"the parts' {what} differ"
    if q0.per_tensor and not (_same([q.scale for q in qs]) and _same([q.zero_point for q in qs])):
        return None, "the parts' per-tensor weight scales differ"
    rows = (lambda ts: ts[0]) if q0.per_tensor else _cat
    bias = [w.bias for w in weights]
    if any(b is None for b in bias) and not all(b is None for b in bias):
        return None, "only some parts have a bias"
    qweight = formats.QTensor(q0.fmt, torch.cat([q.codes for q in qs]), rows([q.scale for q in qs]),
                              rows([q.zero_point for q in qs]), q0.global_scale, q0.group_size, q0.per_tensor)
    return (replace(first, name=first.name.rsplit(".", 1)[0] + ".fused", qweight=qweight, bias=_cat(bias)), None), ""
