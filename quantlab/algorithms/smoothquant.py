"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into weights with per-channel scales."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SmoothQuantParams:
    """SmoothQuant parameters.

    Attributes:
        alpha: migration strength in s = max|X|^alpha / max|W|^(1-alpha).
        alpha_search: pick alpha per smoothing group from ``alpha_grid`` by the quantized output error
            on the calibration data.
        alpha_grid: candidates for the search.
    """

    alpha: float = 0.5
    alpha_search: bool = False
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
