"""AsyncLLM streams cumulative outputs that end in the same tokens as the offline engine, refuses bad
prompts before the first output, and aborts a request whose consumer stops listening."""

from __future__ import annotations

import asyncio

import pytest

from quantlab.engine.async_llm import AsyncLLM
from quantlab.engine.llm import LLM
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import EngineRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_engine):
    llm = AsyncLLM.from_engine_dir(tiny_engine)
    yield llm
    asyncio.run(llm.shutdown())


async def _collect(llm, prompt, rid, params=GREEDY):
    return [out async for out in llm.generate(prompt, params, rid)]


def test_streams_cumulative_outputs_equal_to_offline(engine, tiny_engine):
    prompts = [[5, 6, 7], list(range(10, 30))]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, f"r{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLM(tiny_engine).generate(prompts, GREEDY)
    for stream, want in zip(streams, offline):
        ids = [o.outputs[0].token_ids for o in stream]
        assert [len(i) for i in ids] == list(range(1, 11))  # one token per output, cumulative
        assert all(a == b[: len(a)] for a, b in zip(ids, ids[1:]))
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert ids[-1] == want.outputs[0].token_ids


def test_bad_prompt_raises_before_any_output(engine):
    async def main():
        gen = engine.generate(list(range(200)), GREEDY, "too-long")
        with pytest.raises(EngineRequestError, match="max_seq_len"):
            await gen.__anext__()

    asyncio.run(main())


def test_consumer_leaving_aborts_the_request(engine):
    async def main():
        gen = engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), "leaver")
        async for out in gen:
            assert not out.finished
            break
        await gen.aclose()
        for _ in range(100):
            if not engine.engine.has_unfinished():
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())
    assert engine.stats().num_blocks_free == engine.stats().num_blocks_total


def test_explicit_abort_ends_the_stream_with_abort(engine):
    async def main():
        outs = []
        async for out in engine.generate([7, 8], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), "ab"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("ab")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort" and len(outs) < 100
