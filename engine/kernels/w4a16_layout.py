"""The W4A16 weight layout: what ``linear.pack`` writes at build time and the kernels in ``w4a16`` read.

- ``qweight`` int32 [K/8, N]: 8 codes per word, INT4 codes stored +8 (0..15, as ``pack_int32``), E2M1 codes
  as they are (sign in bit 3). Within each group of G weights along K (S = G/8 words), word ``g*S + i``
  holds in nibble j (bits 4j..4j+3) the weight ``k = g*G + j*S + i``: a word's 8 weights share one group
  (one scale), and nibble j of S consecutive words covers S consecutive k, so the activations the kernel
  pairs with nibble j are contiguous (vector loads). ``formats.pack`` packs the permuted codes.
- ``scales`` [K/group, N] in the checkpoint's scale dtype (bf16 for INT4, E4M3 for NVFP4, E8M0 uint8 for
  MXFP4): the transpose of the stored scales, one contiguous row per group.
- ``zeros`` int8 [K/group, N] (INT4 asym only): the transposed zero points.
- ``global_scale`` float32 [1] (NVFP4 only): divides the accumulator once (it is per tensor).

Columns are N (output features) so a tile's loads are coalesced along N, every byte read once.
"""

from __future__ import annotations

import torch

from quantlab.formats.pack import pack_int32, pack_nibbles, unpack_int32, unpack_nibbles
from quantlab.formats.spec import get_spec


def pack_w4(fmt: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            global_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The kernel's tensors from a QTensor's fields (codes unpacked [N, K], scales [N, K/group])."""
    n, k = codes.shape
    group = k // scale.shape[1]
    codes = codes.reshape(n, k // group, 8, group // 8).transpose(2, 3).reshape(n, k)  # see the module docstring
    if get_spec(fmt).family == "int":
        words = pack_int32(codes, dim=1)
    else:
        words = pack_nibbles(codes).reshape(-1).view(torch.int32).reshape(codes.shape[0], -1)
    out = {"qweight": words.t().contiguous(), "scales": scale.t().contiguous()}
    if zero_point is not None:
        out["zeros"] = zero_point.t().contiguous()
    if global_scale is not None:
        out["global_scale"] = global_scale.float().reshape(1)
    return out


def unpack_w4(fmt: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``pack_w4`` for the reference path: (codes [N, K], scale [N, K/group], zero_point)."""
    words = tensors["qweight"].t().contiguous()
    if get_spec(fmt).family == "int":
        codes = unpack_int32(words, dim=1)
    else:
        codes = unpack_nibbles(words.reshape(-1).view(torch.uint8)).reshape(words.shape[0], -1)
    n, k = codes.shape
    group = k // tensors["scales"].shape[0]
    codes = codes.reshape(n, k // group, group // 8, 8).transpose(2, 3).reshape(n, k)
    zp = tensors.get("zeros")
    return codes, tensors["scales"].t().contiguous(), None if zp is None else zp.t().contiguous()
