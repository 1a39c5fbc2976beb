"""AWQ (Lin et al. 2024): activation-aware per-input-channel scales, then weight clipping search."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AWQParams:
    """AWQ parameters.

    Attributes:
        grid: number of points of the scale-exponent search in [0, 1).
        duo_scaling: scales from both activation and weight magnitudes (AutoAWQ's default).
        clip_search: search a per-group clipping ratio after scaling.
        clip_grid: number of clipping ratios tried between 1 and ``max_shrink``.
        max_shrink: smallest clipping ratio tried.
    """

    grid: int = 20
    duo_scaling: bool = True
    clip_search: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
