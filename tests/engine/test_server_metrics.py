"""GET /metrics: vLLM's names under quantlab:, counters equal to what was sent, gauges read from the engine."""

from __future__ import annotations

import httpx2
import openai

from fake_async_llm import FakeAsyncLLM
from quantlab.engine.metrics import ServerMetrics
from server_harness import running_server, scrape

VLLM_NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
              "prefix_cache_queries_total", "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
              "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
              "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"]


def test_metrics_carry_vllm_names_under_the_quantlab_prefix():
    with running_server(FakeAsyncLLM()) as (base, _):
        r = httpx2.get(base + "/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        samples = scrape(base)
    for name in VLLM_NAMES:
        assert "quantlab:" + name in samples, name
    assert 'model_name="fake-model"' in r.text


def test_counters_equal_what_was_sent():
    llm = FakeAsyncLLM()
    with running_server(llm) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        client.completions.create(model="fake-model", prompt=[1, 2, 3], max_tokens=4)
        client.completions.create(model="fake-model", prompt=[4, 5], max_tokens=3, n=2, seed=0)
        list(client.completions.create(model="fake-model", prompt=[6] * 7, max_tokens=5, stream=True))
        text = client.completions.create(model="fake-model", prompt=[8, 9], max_tokens=6).choices[0].text
        stopped = client.completions.create(model="fake-model", prompt=[8, 9], max_tokens=6, stop=text[3])
        httpx2.post(base + "/v1/completions", json={"prompt": "x", "top_p": 9})
        httpx2.post(base + "/v1/completions", json={"prompt": "x", "model": "nope"})
        m = scrape(base)
    stop_tokens = stopped.usage.completion_tokens
    assert m["quantlab:prompt_tokens_total"] == 3 + 2 + 7 + 2 + 2  # n=2 counts its prompt once
    assert m["quantlab:generation_tokens_total"] == 4 + 3 * 2 + 5 + 6 + stop_tokens == llm.num_generated
    assert m['quantlab:request_success_total{finished_reason="length"}'] == 5
    assert m['quantlab:request_success_total{finished_reason="stop"}'] == 1
    assert m['quantlab:request_rejected_total{status="400"}'] == 1
    assert m['quantlab:request_rejected_total{status="404"}'] == 1
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert m[f"quantlab:{h}_count"] == 6, h
    assert m["quantlab:inter_token_latency_seconds_count"] == (4 + 3 * 2 + 5 + 6 + stop_tokens) - 6
    assert m["quantlab:kv_cache_usage_perc"] == 0 and m["quantlab:num_requests_running"] == 0


class _Stats:
    num_running, num_waiting, kv_cache_usage = 3, 5, 0.25
    prefix_cache_hits, prefix_cache_queries, num_preemptions_total = 40, 100, 2


def test_engine_gauges_are_read_at_scrape_time():
    stats = _Stats()
    m = ServerMetrics(lambda: stats, "m")
    text = m.render().decode()
    assert 'quantlab:num_requests_waiting{model_name="m"} 5.0' in text
    stats.num_waiting = 7
    assert 'quantlab:num_requests_waiting{model_name="m"} 7.0' in m.render().decode()
    assert 'quantlab:prefix_cache_hits_total{model_name="m"} 40.0' in text
    assert 'quantlab:kv_cache_usage_perc{model_name="m"} 0.25' in text
