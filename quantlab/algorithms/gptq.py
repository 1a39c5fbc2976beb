"""GPTQ (Frantar et al. 2023): Hessian-aware column-by-column rounding with error compensation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GPTQParams:
    """GPTQ parameters.

    Attributes:
        block_size: columns per lazy-update block.
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        act_order: process columns by decreasing Hessian diagonal.
        static_groups: with act_order, compute group scales before reordering so groups stay
            contiguous and no ``g_idx`` is needed in the checkpoint.
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = False
    static_groups: bool = True
