"""A checkpoint written by an earlier quantlab (tests/data/legacy, made by make_legacy_checkpoints.py
before scales became module data) reads back to bit-identical logits."""

from pathlib import Path

import pytest
import safetensors.torch
import torch

from quantlab.checkpoint.reader import load_quantized

LEGACY = Path(__file__).resolve().parent.parent / "data" / "legacy"
CASES = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


def test_legacy_fixtures_are_present():
    assert CASES == ["nvfp4-int4asym-kvtensor", "static-fp8-int8-kvhead"]


@pytest.mark.parametrize("name", CASES)
def test_legacy_checkpoint_reads_back_to_identical_logits(name):
    expected = safetensors.torch.load_file(str(LEGACY / f"{name}.expected.safetensors"))
    model, _, _ = load_quantized(LEGACY / name)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
