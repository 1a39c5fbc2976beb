"""Every shipped recipe, end to end on the real default model (SmolLM2-135M) with a small calibration
set: calibration runs, the quantized model's perplexity on held-out text stays within the recipe's
stated bound of the float baseline, GPTQ and AWQ beat RTN at the same bits, and the checkpoint builds
into a CPU engine that generates and passes ``quantlab verify`` against it.

Bounds are the increase measured at this small calibration size (8 x 128 tokens; perplexity on the first
1,024 tokens of calib_data/heldout/apache-2.0.txt; CPU, 2026-11-24) or at the full 32 x 256 where noted,
with headroom; docs/accuracy.md has the full-size figures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from quantlab.checkpoint.writer import write_checkpoint
from quantlab.data import build_calibration_set, load_texts
from quantlab.engine.builder import build_engine
from quantlab.engine.llm import LLM
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.verify import DEFAULT_THRESHOLD
from quantlab.engine.verify_order import verify
from quantlab.models import load_model
from quantlab.pipeline import calibrate
from quantlab.recipe import load_recipe
from quantlab.recipe.schema import BuildOptions

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipe -> largest allowed perplexity increase over the float baseline, in percent.
BOUNDS = {
    "fp8-dynamic": 6,  # measured +4.0%
    "fp8-static": 10,  # +6.6%
    "w8a8-int8": 4,  # +2.4%
    "w8a8-smoothquant": 3,  # -0.6%
    "w4a16-rtn": 40,  # +32.7% (data-free: independent of the calibration size)
    "w4a16-awq": 20,  # +11.0%
    "w4a16-gptq": 20,  # +9.0% at 32 x 256
    "nvfp4a16": 25,  # +18.9% (data-free; one global scale per fused q/k/v and gate/up)
    "nvfp4": 70,  # +45.4% at 32 x 256
    "mxfp4": 75,  # +59.3% (data-free)
}
# recipe -> quantized perplexity, computed once per run by whichever test needs it first
_PPL: dict[str, float] = {}
# recipe -> its checkpoint, written by the same calibration
_CHECKPOINTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tokenizer = load_model("smollm2-135m")
    text = "\n\n".join(load_texts("calib_data/heldout/apache-2.0.txt"))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :1024]
    return model, tokenizer, ids, _ppl(model, ids), tmp_path_factory.mktemp("checkpoints")


def _ppl(model, ids) -> float:
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def test_every_shipped_recipe_has_a_bound():
    assert sorted(BOUNDS) == sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _quantized_ppl(setup, name: str) -> float:
    """Perplexity of the model calibrated with recipe ``name`` at the small calibration size (cached; the
    checkpoint of that calibration is written too)."""
    if name not in _PPL:
        model0, tokenizer, ids, _, out = setup
        recipe = load_recipe(RECIPES / f"{name}.yaml", {"calibration.num_samples": 8, "calibration.seq_len": 128})
        model = copy.deepcopy(model0)
        calib = build_calibration_set(recipe.calibration, tokenizer)
        result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
        _PPL[name] = _ppl(model, ids)
        _CHECKPOINTS[name] = write_checkpoint(model, tokenizer, recipe, calib, result, out / name).path
    return _PPL[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_recipe_stays_within_bound_of_float_baseline(setup, name):
    base = setup[3]
    ppl = _quantized_ppl(setup, name)
    increase = 100 * (ppl / base - 1)
    print(f"{name}: perplexity {ppl:.3f} vs float {base:.3f} ({increase:+.1f}%)")
    # Quantization noise may even lower perplexity on a short text (SmoothQuant W8A8 does here), so only
    # the upper bound is a property; the model must have changed, though.
    assert ppl != base and increase < BOUNDS[name], f"{name}: perplexity {ppl:.3f} vs float {base:.3f} ({increase:+.1f}%)"


@pytest.mark.slow
@pytest.mark.parametrize("better", ["w4a16-gptq", "w4a16-awq"])
def test_gptq_and_awq_beat_rtn_at_the_same_bits(setup, better):
    """Stands alone: calibrates both recipes itself unless an earlier test of this run already did."""
    assert _quantized_ppl(setup, better) < _quantized_ppl(setup, "w4a16-rtn"), _PPL


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_recipe_checkpoint_builds_generates_and_passes_verify(setup, name, tmp_path):
    """Issue 15's bar on the CPU: the checkpoint builds (gates skipped: no eval here), the engine generates,
    and ``quantlab verify``'s default order (engine order for 4-bit activations) passes at its threshold."""
    _quantized_ppl(setup, name)
    engine = tmp_path / "engine"
    build_engine(str(_CHECKPOINTS[name]), engine, BuildOptions(max_batch_size=4, max_seq_len=128, max_num_tokens=256,
                                                                device="cpu"), skip_gates=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = LLM(engine).generate(["The capital of France is"], params)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text
    result, _ = verify(engine, _CHECKPOINTS[name], num_prompts=4, max_tokens=8)
    assert result.within_gap >= DEFAULT_THRESHOLD, f"{name}: {result.summary()}"

