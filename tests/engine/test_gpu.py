"""The CUDA path: decode CUDA graphs are captured and give the eager path's tokens, a prompt's output is the
same alone and in a padded graph batch, and BF16 and FP8-KV engines pass verify against their references."""

from __future__ import annotations

import pytest
from engine_helpers import build

from quantlab.engine.llm import LLM
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.verify import DEFAULT_THRESHOLD, verify_engine_against
from quantlab.recipe.schema import ActivationScheme, KVCacheScheme, SchemeGroup, WeightScheme

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1)]


@pytest.fixture(scope="module")
def cuda_engine(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "bf16"
    build(tiny_model[0], out, device="cuda", dtype="bfloat16")
    return out


def test_graphs_are_captured_and_match_eager(cuda_engine):
    graphs = LLM(cuda_engine)
    assert graphs.engine.runner.report.graph_batch_sizes == (1, 2, 4, 8)
    eager = LLM(cuda_engine, enforce_eager=True)
    assert not eager.engine.runner.graphs
    want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, GREEDY)]
    assert [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, GREEDY)] == want


def test_prompt_alone_equals_inside_padded_graph_batch(cuda_engine):
    llm = LLM(cuda_engine)
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone


def test_bf16_cuda_engine_passes_verify(cuda_engine, tiny_model):
    result = verify_engine_against(cuda_engine, tiny_model[0], prompts=PROMPTS, max_tokens=16)
    assert result.within_gap >= DEFAULT_THRESHOLD, result.summary()


def test_fp8_kv_cuda_engine_passes_verify_against_its_checkpoint(make_checkpoint, tmp_path):
    groups = [SchemeGroup(("Linear",), WeightScheme("fp8_e4m3", "channel"), ActivationScheme("fp8_e4m3", "token", True))]
    ckpt = make_checkpoint(groups, KVCacheScheme())
    config = build(ckpt, tmp_path / "eng", device="cuda", dtype="bfloat16").config
    assert config.kv_cache_dtype == "fp8_e4m3" and config.kv_scales == "checkpoint"
    result = verify_engine_against(tmp_path / "eng", ckpt, prompts=PROMPTS, max_tokens=16)
    assert result.within_gap >= DEFAULT_THRESHOLD, result.summary()
