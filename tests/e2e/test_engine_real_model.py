"""The BF16 engine of the real default model (SmolLM2-135M) builds, loads, generates and passes
``quantlab verify`` against transformers' float32 model (a small prompt count keeps it under a minute on
two CPU cores)."""

from __future__ import annotations

import pytest

from quantlab.engine.builder import build_engine
from quantlab.engine.verify import DEFAULT_GAP, DEFAULT_THRESHOLD, verify_engine_against
from quantlab.recipe.schema import BuildOptions

pytestmark = pytest.mark.slow


def test_bf16_engine_of_default_model_passes_verify(tmp_path):
    summary = build_engine("smollm2-135m", tmp_path / "engine",
                           BuildOptions(max_batch_size=8, max_seq_len=256, max_num_tokens=256, device="cpu"))
    assert summary.config.dtype == "bfloat16" and summary.config.model.tie_word_embeddings
    result = verify_engine_against(tmp_path / "engine", "smollm2-135m", num_prompts=4, max_tokens=8)
    assert result.within_gap >= DEFAULT_THRESHOLD, result.summary()
    assert result.top1 >= 0.8, result.summary()
    assert result.max_first_step_logit_diff < DEFAULT_GAP * 2, result.summary()
