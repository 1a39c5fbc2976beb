"""Bit packing of 4-bit codes, exactly as the checkpoint stores them.

Two layouts, both little-end first:
- ``pack_nibbles``: two 4-bit codes per uint8 along the last dimension; element ``2i`` in the low nibble
  (bits 0-3), element ``2i+1`` in the high nibble (bits 4-7). Used for E2M1 (NVFP4/MXFP4
  ``weight_packed``), as compressed-tensors and vLLM read it.
- ``pack_int32``: eight signed int4 codes per int32, offset by +8 to 0..15; element ``8j+k`` sits in bits
  ``4k .. 4k+3`` of word ``j`` (compressed-tensors ``pack_to_int32``, num_bits=4). ``dim=1`` packs along
  columns (``weight_packed``), ``dim=0`` along rows (asymmetric ``weight_zero_point``).
"""

from __future__ import annotations

import torch

from ..errors import FormatError


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes (values 0..15, even last dimension) two per byte."""
    if codes.shape[-1] % 2:
        raise FormatError(f"cannot pack an odd last dimension ({codes.shape[-1]}) two codes per byte")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: uint8 [..., n] -> uint8 codes [..., 2n]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


# A pack_int32 word holds four pack_nibbles bytes, least significant first: element 8j+k sits
# in byte k // 2 of word j, low nibble when k is even. On a little-endian machine (every platform torch
# runs on) that is exactly pack_nibbles' byte stream viewed as int32, so both directions are a nibble
# (un)pack plus a free reinterpretation.


def pack_int32(codes: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack a 2-D int8 tensor of int4 codes (-8..7) eight per int32 along ``dim`` (multiple of 8)."""
    if codes.ndim != 2 or codes.shape[dim] % 8:
        raise FormatError(f"pack_int32 needs a 2-D tensor whose dim {dim} is a multiple of 8 (got {tuple(codes.shape)})")
    values = (codes.to(torch.int16) + 8).to(torch.uint8)
    if dim == 0:
        values = values.t()
    # Viewed flat: a view to a wider dtype also checks the strides of size-1 dimensions.
    words = pack_nibbles(values).reshape(-1).view(torch.int32).reshape(values.shape[0], -1)
    return words.t().contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 words -> int8 codes in -8..7."""
    if dim == 0:
        words = words.t()
    codes = unpack_nibbles(words.reshape(-1).view(torch.uint8)).to(torch.int8).reshape(words.shape[0], -1) - 8
    return codes.t().contiguous() if dim == 0 else codes
