"""The OpenAI surface with the official client: both endpoints, streaming and not, n, stop, logprobs."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

from fake_async_llm import FakeAsyncLLM, token_at
from server_harness import running_server


@pytest.fixture(scope="module")
def server():
    llm = FakeAsyncLLM()
    with running_server(llm) as (url, state):
        yield url, llm


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_text_and_usage_match_the_engine(client, server):
    r = client.completions.create(model="fake-model", prompt="hello", max_tokens=5)
    tokenizer = server[1].tokenizer
    expected = [token_at(tokenizer.encode("hello"), i, None) for i in range(5)]
    assert r.choices[0].text == tokenizer.decode(expected)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 5, 10)
    assert r.object == "text_completion" and r.model == "fake-model"


def test_streamed_completion_concatenates_to_the_whole_one(client):
    whole = client.completions.create(model="fake-model", prompt=[5, 6, 7], max_tokens=6).choices[0].text
    chunks = list(client.completions.create(model="fake-model", prompt=[5, 6, 7], max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 3


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="fake-model", prompt="abc", max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_stream_is_sse_ending_in_done(server):
    body = {"prompt": "abc", "max_tokens": 3, "stream": True}
    with httpx2.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]


def test_chat_stream_and_whole_answer_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_max_completion_tokens_is_max_tokens_for_chat(client):
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_n_fans_out_into_n_choices_seeded_apart(client):
    r = client.completions.create(model="fake-model", prompt="seeded", max_tokens=4, n=3, seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3, "seed + i should give each choice its own sample"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 12
    again = client.completions.create(model="fake-model", prompt="seeded", max_tokens=4, n=3, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_streamed_fan_out_keeps_choices_apart(client):
    r = client.completions.create(model="fake-model", prompt="fan", max_tokens=4, n=2, seed=1)
    texts = {0: "", 1: ""}
    for c in client.completions.create(model="fake-model", prompt="fan", max_tokens=4, n=2, seed=1, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == {c.index: c.text for c in r.choices}


def test_batch_of_prompts_gives_a_choice_per_prompt(client):
    r = client.completions.create(model="fake-model", prompt=["ab", "cde"], max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 5


def test_stop_string_ends_with_finish_reason_stop(client):
    text = client.completions.create(model="fake-model", prompt="hello", max_tokens=8).choices[0].text
    stop = text[2]
    r = client.completions.create(model="fake-model", prompt="hello", max_tokens=8, stop=[stop])
    assert r.choices[0].finish_reason == "stop"


def test_completion_logprobs_have_openai_legacy_shape(client):
    r = client.completions.create(model="fake-model", prompt="lp", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset == [0, 1, 2]
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat_logprobs_list_top_alternatives(client):
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 2 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert httpx2.get(server[0] + "/health").json() == {"status": "ok"}


def test_priority_orders_the_queue():
    llm = FakeAsyncLLM(max_batch_size=1, step_time=0.02)

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.005)

    with running_server(llm) as (url, _):
        async def main():
            async with httpx2.AsyncClient(base_url=url, timeout=30) as c:
                done = []

                async def send(name, priority, max_tokens=2):
                    await c.post("/v1/completions", json={"prompt": name, "max_tokens": max_tokens, "priority": priority})
                    done.append(name)
                busy = asyncio.create_task(send("busy", 0, 20))  # holds the only batch slot
                await until(lambda: llm.stats().num_running == 1)
                low = asyncio.create_task(send("low", 5))  # queues first ...
                await until(lambda: llm.stats().num_waiting == 1)
                await asyncio.gather(send("high", 0), low, busy)  # ... but "high" is served before it
                return done
        assert asyncio.run(main()) == ["busy", "high", "low"]
