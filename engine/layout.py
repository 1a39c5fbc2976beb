"""Fusing q/k/v and gate/up into one projection at build time, where the stored format allows it.

The parts are concatenated along the output features *before* ``kernels.linear.pack`` sees them, so the
kernel's own layout (transposed, nibble-packed, ...) is made once, from one weight, and stays valid
whatever ``pack`` does. That needs every part's per-row tensors (codes, group/channel scales, zero points,
biases) to stack and every part's whole-tensor numbers to agree: one scale for the whole fused tensor
must be *the* scale of each part, because requantizing a calibrated checkpoint is not allowed (it would no
longer be the checkpoint that passed evaluation). Per-tensor weight scales are the exception that costs
nothing: parts whose per-tensor scales differ fuse into one per-channel tensor, each row carrying its
part's scale, which dequantizes to exactly the same values (vLLM requantizes such parts to their largest
scale instead, which changes the codes); the W8A8 kernels take per-channel weight scales anyway. An NVFP4
global scale, a static input scale or per-tensor zero points that differ keep the projection unfused:
its parts are stored and applied separately, and engine.json's ``fusion`` says why.
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
    per_tensor, scales = q0.per_tensor, [q.scale for q in qs]
    if per_tensor and not (_same(scales) and _same([q.zero_point for q in qs])):
        if q0.zero_point is not None:
            return None, "the parts' per-tensor weight scales or zero points differ"
        # One per-channel scale per row ([N, 1], formats' per-channel shape), each its part's scale.
        per_tensor, scales = False, [q.scale.reshape(1, 1).expand(q.codes.shape[0], 1) for q in qs]
    rows = (lambda ts: ts[0]) if per_tensor else _cat
    bias = [w.bias for w in weights]
    if any(b is None for b in bias) and not all(b is None for b in bias):
        return None, "only some parts have a bias"
    qweight = formats.QTensor(q0.fmt, torch.cat([q.codes for q in qs]), rows(scales),
                              rows([q.zero_point for q in qs]), q0.global_scale, q0.group_size, per_tensor)
    return (replace(first, name=first.name.rsplit(".", 1)[0] + ".fused", qweight=qweight, bias=_cat(bias)), None), ""
