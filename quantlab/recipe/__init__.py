"""Recipes: YAML files describing a quantization run, loaded once into frozen dataclasses.

``load_recipe`` is the only entry point that reads YAML; everything else takes a ``Recipe``.
"""

from .load import load_recipe
from .schema import (
    ActivationScheme,
    BuildOptions,
    CalibrationConfig,
    EvalConfig,
    Gates,
    KVCacheScheme,
    Recipe,
    SchemeGroup,
    Stage,
    WeightScheme,
)

__all__ = [
    "ActivationScheme",
    "BuildOptions",
    "CalibrationConfig",
    "EvalConfig",
    "Gates",
    "KVCacheScheme",
    "Recipe",
    "SchemeGroup",
    "Stage",
    "WeightScheme",
    "load_recipe",
]
