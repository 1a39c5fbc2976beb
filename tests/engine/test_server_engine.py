"""The server in front of the real engine (a tiny random Llama): what the official client receives is
what the offline engine generates, streamed or not, and a client leaving returns its blocks."""

from __future__ import annotations

import httpx2
import openai
import pytest

from engine_helpers import build
from quantlab.engine.async_llm import AsyncLLM
from quantlab.engine.llm import LLM
from quantlab.engine.sampling import SamplingParams
from server_harness import running_server, scrape, wait_until


@pytest.fixture(scope="module")
def engine_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    build(tiny_model[0], out, max_batch_size=8, max_num_tokens=64)
    return out


@pytest.fixture(scope="module")
def served(engine_dir):
    llm = AsyncLLM.from_engine_dir(engine_dir)
    with running_server(llm) as (url, _):
        yield url, llm


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_completion_equals_the_offline_engine(client, served, engine_dir):
    prompt = [5, 9, 13, 17]
    want = LLM(engine_dir).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    r = client.completions.create(model=served[1].model_name, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.outputs[0].text and r.usage.completion_tokens == 12
    streamed = client.completions.create(model=served[1].model_name, prompt=prompt, max_tokens=12, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == want.outputs[0].text


def test_chat_uses_the_engine_template(client, served, engine_dir):
    messages = [{"role": "user", "content": "t5 t6 t7"}]
    want = LLM(engine_dir).chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    r = client.chat.completions.create(model=served[1].model_name, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)


def test_client_leaving_returns_blocks_to_the_engine(served):
    url, llm = served
    body = {"prompt": [3, 4, 5], "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx2.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events)
        assert llm.stats().num_blocks_free < llm.stats().num_blocks_total
    wait_until(lambda: llm.stats().num_blocks_free == llm.stats().num_blocks_total, timeout=10, what="blocks returned")
    llm.engine.block_manager.check_integrity()
    assert scrape(url)['quantlab:request_success_total{finished_reason="abort"}'] == 1, "aborted, not run to the end"


def test_overlong_prompt_is_refused_with_400(served):
    r = httpx2.post(served[0] + "/v1/completions", json={"prompt": list(range(3, 200))}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_quantlab_serve_cli_answers_then_exits_0_on_sigterm(engine_dir):
    import os
    import signal
    import subprocess
    import sys

    from server_harness import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-c", "import sys; from quantlab.cli import main; sys.argv[0] = 'quantlab'; main()",
           "serve", str(engine_dir), "--port", str(port), "--grace-period", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx2.get(base + "/health", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    try:
        wait_until(up, timeout=60, what="quantlab serve up")
        r = httpx2.post(base + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert r.json()["model"] == engine_dir.name
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_engine_counters_reach_metrics(served):
    url, llm = served
    before = scrape(url)
    prompt = list(range(20, 33))  # 13 tokens: three full 4-token blocks to find in the prefix cache
    for _ in range(2):
        r = httpx2.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True}, timeout=30)
        assert r.status_code == 200
    after = scrape(url)
    stats = llm.stats()
    assert after["quantlab:prefix_cache_queries_total"] == stats.prefix_cache_queries > before["quantlab:prefix_cache_queries_total"]
    assert after["quantlab:prefix_cache_hits_total"] == stats.prefix_cache_hits >= before["quantlab:prefix_cache_hits_total"] + 12
    assert after["quantlab:prompt_tokens_total"] - before["quantlab:prompt_tokens_total"] == 26
    assert after["quantlab:kv_cache_usage_perc"] == 0 and after["quantlab:num_requests_running"] == 0
