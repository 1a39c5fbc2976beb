"""What calibration hands on besides the quantized model: per-layer error, time and memory, and which
scheme group each quantized module got.

It sits apart from ``quantlab.pipeline`` so that the checkpoint writer reads it as data: the writer
imports neither the pipeline nor its matching rules, and takes each module's scheme from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .recipe.schema import SchemeGroup


@dataclass
class LayerStats:
    """Per-layer summary: relative MSE of the quantized vs float layer output on the same inputs (the
    first calibration batch: the float layer runs only on it, which is enough for this estimate and
    saves most of a pass over the data per layer)."""

    name: str
    rel_mse: float
    seconds: float
    peak_mem_mib: float


@dataclass
class CalibrationResult:
    """What calibration produced besides the modified model.

    Attributes:
        layers: per decoder layer, in order.
        seconds: wall time of the whole calibration.
        peak_mem_mib: the largest per-layer peak memory.
        notes: messages for the user (e.g. a fallback an algorithm took).
        kv_states: the KV-cache quantizers attached to the model.
        schemes: full module name -> the scheme group (an element of ``recipe.schemes``) it was
            quantized with, for every module that is now a ``QuantLinear``.
    """

    layers: list[LayerStats]
    seconds: float
    peak_mem_mib: float
    notes: list[str] = field(default_factory=list)
    kv_states: list = field(default_factory=list)
    schemes: dict[str, SchemeGroup] = field(default_factory=dict)
