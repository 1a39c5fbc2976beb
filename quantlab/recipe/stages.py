"""The recipe's stage vocabulary: each algorithm's parameter dataclass and which algorithms transform
and which round.

They live with the recipe, not with the algorithms, so that validating a recipe never imports the
calibration code: ``quantlab.algorithms`` imports these classes (one way), and the recipe loader checks
a stage's keys against them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RTNParams:
    """RTN has no parameters: the range comes from the scheme's observer."""


@dataclass(frozen=True, slots=True)
class GPTQParams:
    """GPTQ parameters.

    Attributes:
        block_size: columns per lazy-update block.
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        act_order: process columns by decreasing Hessian diagonal.
        static_groups: with act_order, compute group scales before reordering so groups stay
            contiguous and no ``g_idx`` is needed in the checkpoint. It must be true with act_order and
            group granularity: quantlab checkpoints store no ``weight_g_idx``.
        true_sequential: inside a decoder layer, quantize the Linears stage by stage in execution
            order (q/k/v, then o, then gate/up, then down) and take each stage's Hessian from inputs
            that already went through the quantized earlier stages, as the reference implementation's
            ``--true-sequential`` and GPTQModel do. False: every Hessian comes from one float pass.
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = False
    static_groups: bool = True
    true_sequential: bool = True


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


ALGORITHMS = {"rtn": RTNParams, "gptq": GPTQParams, "smoothquant": SmoothQuantParams, "awq": AWQParams}
ROUNDERS = frozenset({"rtn", "gptq"})
TRANSFORMS = frozenset({"smoothquant", "awq"})
