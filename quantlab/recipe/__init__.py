"""Recipes: YAML files describing a quantization run, loaded once into frozen dataclasses.

``load_recipe`` is the only entry point that reads YAML; everything else takes a ``Recipe``.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    # ``load_recipe`` is imported on first use: the loader needs ``quantlab.algorithms``, whose modules
    # import ``quantlab.recipe.schema`` (through the observers), so importing it here would make
    # ``import quantlab.algorithms`` circular.
    if name == "load_recipe":
        from .load import load_recipe

        return load_recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
