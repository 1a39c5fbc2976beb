"""Calibration algorithms: transforms (smoothquant, awq) change weights without changing the float
function; rounders (rtn, gptq) choose the quantized values. Recipe names map to parameter dataclasses
here; ``quantlab.pipeline`` maps them to the code that runs them."""

from .awq import AWQParams
from .gptq import GPTQParams
from .rtn import RTNParams
from .smoothquant import SmoothQuantParams

ALGORITHMS = {"rtn": RTNParams, "gptq": GPTQParams, "smoothquant": SmoothQuantParams, "awq": AWQParams}
ROUNDERS = frozenset({"rtn", "gptq"})
TRANSFORMS = frozenset({"smoothquant", "awq"})

__all__ = ["ALGORITHMS", "ROUNDERS", "TRANSFORMS", "AWQParams", "GPTQParams", "RTNParams", "SmoothQuantParams"]
