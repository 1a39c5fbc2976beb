"""Engine test fixtures: a tiny random Llama as an HF directory (with a WordLevel tokenizer and a chat
template) and engines built from it, shared across the session because building is the slow part."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import build, save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(HF dir, float32 transformers model) of the tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-src")
    return path, save_tiny(path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tmp_path_factory):
    """A float32 engine of the tiny Llama (exact comparisons with transformers)."""
    out = tmp_path_factory.mktemp("engines") / "tiny-f32"
    build(tiny_model[0], out)
    return out


@pytest.fixture(scope="session")
def make_checkpoint(tiny_model, tmp_path_factory):
    """make_checkpoint(groups, kv=None) -> path of an RTN-calibrated checkpoint of the tiny Llama (as
    tests/checkpoint/conftest.py makes them), cached per scheme list."""
    from quantlab.algorithms import RTNParams
    from quantlab.checkpoint.writer import write_checkpoint
    from quantlab.data import CalibrationSet, digest
    from quantlab.models import load_model
    from quantlab.pipeline import calibrate
    from quantlab.recipe.schema import CalibrationConfig, Recipe, Stage

    made = {}

    def run(groups, kv=None, ignore=("lm_head",)):
        key = repr((groups, kv, ignore))
        if key not in made:
            model, tokenizer = load_model(str(tiny_model[0]))
            recipe = Recipe(path="tests/tiny.yaml", text="# tiny\n", sha256="0" * 64, model=str(tiny_model[0]),
                            output="unused", calibration=CalibrationConfig(num_samples=4, seq_len=16, seed=0),
                            schemes=tuple(groups), stages=(Stage("rtn", RTNParams()),), ignore=ignore, kv_cache=kv,
                            export_dtype="float32")
            ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
            calib = CalibrationSet(ids, "test", digest(ids))
            result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
            out = tmp_path_factory.mktemp("ckpt") / "ckpt"
            made[key] = write_checkpoint(model, tokenizer, recipe, calib, result, out).path
        return made[key]

    return run

