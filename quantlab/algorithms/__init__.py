"""Calibration algorithms: transforms (smoothquant, awq) change weights without changing the float
function; rounders (rtn, gptq) choose the quantized values. Their parameter dataclasses and the
algorithm names belong to the recipe (``quantlab.recipe.stages``) and are re-exported here;
``quantlab.pipeline`` maps the names to the code that runs them."""

from ..recipe.stages import ALGORITHMS, ROUNDERS, TRANSFORMS, AWQParams, GPTQParams, RTNParams, SmoothQuantParams

__all__ = ["ALGORITHMS", "ROUNDERS", "TRANSFORMS", "AWQParams", "GPTQParams", "RTNParams", "SmoothQuantParams"]
