"""The offline tasks run through lm-eval itself on the real default model: the float model scores clearly
above chance, and a deliberately broken quantization scores measurably lower, so the gates can fail.

The broken model is honest rather than contrived: every decoder Linear weight is quantized to symmetric
INT4 with ONE scale per matrix (``per_tensor=True``, min-max), a real misconfiguration. A single
outlier sets the scale for the whole matrix, so most weights round to zero.

Measured with LIMIT = 16 on the committed task data (seed 1234): float cloze acc 0.625, continuation
acc 0.375 / acc_norm 0.5625; broken cloze acc 0.0, continuation acc 0.3125 / acc_norm 0.1875. Chance
is 0.25 for the 4-way continuation task (P[acc_norm >= 0.5625 | chance] < 0.01 at n = 16). Plain acc
alone barely separates the two models here: acc_norm is the continuation task's primary metric.
"""

import copy

import pytest
import torch
from torch import nn

from quantlab import formats
from quantlab.errors import QuantlabError
from quantlab.evaluation.gates import Metrics, check_gates
from quantlab.evaluation.tasks import run_tasks
from quantlab.models import load_model
from quantlab.recipe.schema import Gates

LIMIT = 16
TASKS = ["quantlab_cloze", "quantlab_continuation"]

pytestmark = pytest.mark.slow  # two models x two tasks through lm-eval: about a minute on two cores


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    model, tokenizer = load_model("smollm2-135m")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for module in broken.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(formats.quantize_dequantize(module.weight, "int4", per_tensor=True))
    # From an unrelated working directory: the task data must not be looked up relative to it.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        return {"float": run_tasks(model, tokenizer, TASKS, limit=LIMIT, seed=1234, batch_size=16),
                "broken": run_tasks(broken, tokenizer, TASKS, limit=LIMIT, seed=1234, batch_size=16)}


def test_float_model_scores_clearly_above_chance(scores):
    f = scores["float"]
    assert f["quantlab_cloze"]["acc"] >= 0.45  # measured 0.625
    assert f["quantlab_continuation"]["acc_norm"] >= 0.45  # measured 0.5625; chance 0.25
    assert set(f["quantlab_continuation"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(f["quantlab_cloze"]) >= {"acc", "perplexity"}


def test_broken_quantization_scores_measurably_lower(scores):
    f, b = scores["float"], scores["broken"]
    assert b["quantlab_cloze"]["acc"] <= f["quantlab_cloze"]["acc"] - 0.3
    assert b["quantlab_cloze"]["perplexity"] > 10 * f["quantlab_cloze"]["perplexity"]
    assert b["quantlab_continuation"]["acc_norm"] <= f["quantlab_continuation"]["acc_norm"] - 0.2


def test_task_recovery_gate_fails_the_broken_model_and_passes_the_float_one(scores):
    gates = Gates(min_task_recovery_pct=80)
    base = Metrics(tasks=scores["float"])
    assert all(g.passed for g in check_gates(base, Metrics(tasks=scores["float"]), gates))
    (g,) = check_gates(base, Metrics(tasks=scores["broken"]), gates)
    assert not g.passed and g.value < 50


def test_unknown_task_is_one_sentence_listing_the_offline_tasks():
    with pytest.raises(QuantlabError, match="lm-eval knows no task quantlab_nope .*quantlab_cloze"):
        run_tasks(nn.Linear(1, 1), None, ["quantlab_cloze", "quantlab_nope"])
