"""The step loop end to end on the CPU: greedy output equals transformers', is the same alone and inside a
mixed batch, survives preemption, honours stop strings and aborts, and refuses impossible requests."""

from __future__ import annotations

import pytest
import torch

from quantlab.engine.llm import LLM, LLMEngine
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import EngineRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1, 12)]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def run_checked(engine: LLMEngine) -> dict[str, list[int]]:
    """Step to the end, checking the block manager's integrity after every step; final token ids."""
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
        engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    return final


def test_generate_equals_transformers_greedy(tiny_model, tiny_engine):
    outs = LLM(tiny_engine).generate([PROMPTS[0], PROMPTS[3]], GREEDY)
    for prompt, out in zip([PROMPTS[0], PROMPTS[3]], outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_model[1], prompt, 12)
        assert out.finished and out.outputs[0].finish_reason == "length" and out.prompt_token_ids == prompt


def test_prompt_alone_equals_inside_mixed_batch(tiny_engine):
    """Batch invariance: chunked prefills and decodes of other requests in the same forward change nothing."""
    engine = LLMEngine(tiny_engine, max_num_tokens=16)  # forces chunked prefill beside running decodes
    alone = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, GREEDY)
        alone.update(run_checked(engine))
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"b{i}", p, SamplingParams(temperature=0, max_tokens=12 - i, ignore_eos=True))
    mixed = run_checked(engine)
    for i in range(len(PROMPTS)):
        assert mixed[f"b{i}"] == alone[f"a{i}"][: 12 - i]


def test_preempted_requests_resume_with_the_same_tokens(tiny_engine):
    roomy = LLMEngine(tiny_engine, enable_prefix_caching=False)
    for i, p in enumerate(PROMPTS):
        roomy.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    want = run_checked(roomy)
    # 40 blocks of 4 tokens (2 KiB each) cannot hold six sequences of up to 70 tokens: max_utilization must
    # preempt.
    tight = LLMEngine(tiny_engine, policy="max_utilization", kv_cache_mib=40 * 2048 / 2**20,
                      enable_prefix_caching=False)
    assert tight.block_manager.num_blocks == 40
    for i, p in enumerate(PROMPTS):
        tight.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    got = run_checked(tight)
    assert tight.stats().num_preemptions_total > 0
    assert got == want


def test_prefix_cache_hit_gives_the_same_tokens(tiny_engine):
    engine = LLMEngine(tiny_engine)
    engine.add_request("first", PROMPTS[3], GREEDY)
    first = run_checked(engine)["first"]
    engine.add_request("again", PROMPTS[3], GREEDY)
    assert run_checked(engine)["again"] == first
    assert engine.stats().prefix_cache_hits >= 24


def test_stop_string_cuts_text_and_finishes(tiny_engine):
    llm = LLM(tiny_engine)
    free = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    word = free.text.split()[3]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(word,)))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == free.text[: free.text.index(word)]


def test_stop_token_id_finishes_with_stop(tiny_engine):
    llm = LLM(tiny_engine)
    free = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0].token_ids
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(free[4],)))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == free[: free.index(free[4]) + 1]


def test_abort_frees_blocks_at_once(tiny_engine):
    engine = LLMEngine(tiny_engine, enable_prefix_caching=False)
    engine.add_request("x", PROMPTS[3], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort("x")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.has_unfinished()


def test_over_long_and_empty_prompts_are_refused(tiny_engine):
    engine = LLMEngine(tiny_engine)
    with pytest.raises(EngineRequestError, match="max_seq_len"):
        engine.add_request("long", list(range(120)), SamplingParams(max_tokens=16))
    with pytest.raises(EngineRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    assert not engine.has_unfinished()


def test_logprobs_are_the_greedy_tokens_log_softmax(tiny_model, tiny_engine):
    out = LLM(tiny_engine).generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                              ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        logits = tiny_model[1](torch.tensor([PROMPTS[0] + out.token_ids])).logits[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(entry) == 2 and token in entry  # greedy token is the top-1 alternative too
        assert entry[token] == pytest.approx(logits[len(PROMPTS[0]) - 1 + i, token].item(), abs=1e-4)


def test_chat_uses_the_template_and_streams_cumulative_text(tiny_engine):
    llm = LLM(tiny_engine)
    messages = [{"role": "user", "content": "t3 t4"}]
    prompt = llm.engine.apply_chat_template(messages)
    assert prompt.endswith("<assistant>") and "t3 t4" in prompt
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].text.strip()


def test_default_cpu_kv_pool_grows_to_one_full_sequence_but_an_explicit_budget_is_kept(tiny_engine, monkeypatch):
    from quantlab.engine import runner
    from quantlab.engine.config import EngineError

    monkeypatch.setattr(runner, "_CPU_KV_DEFAULT_BYTES", 1024)  # far below one sequence of max_seq_len
    engine = LLMEngine(tiny_engine)
    assert engine.block_manager.num_blocks * engine.block_manager.tokens_per_block >= engine.max_seq_len
    with pytest.raises(EngineError, match="fewer than one sequence of max_seq_len"):
        LLMEngine(tiny_engine, kv_cache_mib=1024 / 2**20)
