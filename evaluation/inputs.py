"""What an evaluation starts from, found and checked before anything is measured: the checkpoint's
provenance (quantlab.json), the recipe whose ``eval`` section applies, the original model, and the rule
that the held-out text is not the calibration text. Shared by ``run`` (one checkpoint) and ``compare``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import tempfile
from pathlib import Path

import torch

from quantlab import __version__
from quantlab.checkpoint.reader import shard_files
from quantlab.data import resolve_data_path
from quantlab.errors import CheckpointError, QuantlabError, RecipeError
from quantlab.models import DEFAULT_MODEL, load_model
from quantlab.recipe.schema import EvalConfig, Recipe

from .text import dataset_files


def read_provenance(checkpoint: Path) -> dict:
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    path = checkpoint / "quantlab.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: {checkpoint} is not a quantlab checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None


def overrides(tasks: list[str] | None, limit: int | None, max_tokens: int | None) -> dict:
    return {k: v for k, v in {"eval.tasks": tasks, "eval.limit": limit, "eval.max_tokens": max_tokens}.items()
            if v is not None}


def load_checkpoint_recipe(checkpoint: Path, provenance: dict, recipe_path: str | None,
                           overrides: dict) -> tuple[Recipe, str]:
    """The recipe whose ``eval`` section applies, and a label saying where it came from.

    ``recipe_path`` wins; otherwise the recipe text embedded in quantlab.json is parsed (at its original
    path when that file still holds the same bytes, so messages name it; else from a temporary copy,
    with messages naming quantlab.json).
    """
    from quantlab.recipe.load import load_recipe

    if recipe_path is not None:
        return load_recipe(recipe_path, overrides), recipe_path
    embedded = provenance.get("recipe") or {}
    where = checkpoint / "quantlab.json"
    if not embedded.get("text"):
        raise RecipeError(str(where), None, "recipe.text", "is missing, so the eval settings are unknown; pass --recipe")
    original = embedded.get("path") or "recipe.yaml"
    p = Path(original)
    if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == embedded.get("sha256"):
        return load_recipe(p, overrides), f"{original} (embedded in {where})"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / p.name
        tmp.write_text(embedded["text"], encoding="utf-8")
        try:
            return load_recipe(tmp, overrides), f"the recipe embedded in {where} ({original})"
        except RecipeError as e:
            raise RecipeError(e.file.replace(str(tmp), f"{where} [recipe {original}]"), e.line, e.key_path,
                              e.expected, e.got) from None


def original_source(checkpoint: Path, provenance: dict, original: str | None) -> tuple[str, str]:
    """(name, what to load) of the original model: ``--original``, else quantlab.json's ``model``."""
    if original is not None:
        return original, original
    model = provenance.get("model")
    name, path = (model.get("name"), model.get("path")) if isinstance(model, dict) else (model, None)
    if not name and not path:
        raise CheckpointError(f"{checkpoint / 'quantlab.json'} names no original model; pass --original")
    if path and Path(path).is_dir():
        return name or path, path
    if name == DEFAULT_MODEL or (name and Path(name).expanduser().is_dir()):
        return name, name  # the default is re-converted into the cache when missing
    if name and path in (None, name) and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return name, name  # a hub id: transformers resolves it (network or HF cache)
    looked = path or name
    raise CheckpointError(f"the original model of {checkpoint} was not found at {looked}; pass --original")


def load_original(name: str, source: str):
    try:
        return load_model(source, torch.float32)
    except CheckpointError as e:
        raise CheckpointError(f"the original model {name} could not be loaded from {source} ({e}); pass --original") from None


def refuse_calibration_text(ev: EvalConfig, recipe: Recipe, provenance: dict) -> None:
    """Evaluating on the text the checkpoint was calibrated on would flatter it: refuse."""
    calib = set()
    for source in ((provenance.get("calibration") or {}).get("source"), recipe.calibration.dataset):
        try:
            calib.add(resolve_data_path(source).resolve())
        except (QuantlabError, TypeError):
            pass  # self-generated, or a file that is gone
    for f in dataset_files(ev.dataset):
        if f.resolve() in calib:
            raise QuantlabError(f"eval.dataset {f} is the calibration text of this checkpoint; "
                                "evaluate on held-out text such as calib_data/heldout/")


def versions() -> dict[str, str | None]:
    def v(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"quantlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": v("transformers"), "lm_eval": v("lm_eval"), "datasets": v("datasets")}


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes of the checkpoint's safetensors files on disk."""
    return sum(f.stat().st_size for f in shard_files(checkpoint))
