"""A client that goes away aborts its engine request at the next step; its KV blocks go back at once."""

from __future__ import annotations

import httpx2
import pytest

from fake_async_llm import FakeAsyncLLM
from server_harness import running_server, scrape, wait_until

STEP = 0.02


def test_disconnect_mid_stream_aborts_and_frees_blocks_within_a_step():
    llm = FakeAsyncLLM(step_time=STEP)
    with running_server(llm) as (base, _):
        body = {"prompt": "bye", "max_tokens": 80, "stream": True}
        with httpx2.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            assert [next(events) for _ in range(3)][-1] != "data: [DONE]"
            assert llm.stats().num_blocks_free < llm.num_blocks, "a streaming request holds blocks"
        # generous for a loaded CI machine: the counters below tell an abort from a request that ran to its end
        wait_until(lambda: llm.stats().num_blocks_free == llm.num_blocks, timeout=10, what="blocks freed")
        assert llm.num_aborted == 1 and llm.num_generated < 80, "aborted, not run to its end"
        llm.check_integrity()
        wait_until(lambda: scrape(base).get('quantlab:request_success_total{finished_reason="abort"}') == 1.0,
                   what="the abort counted")


def test_disconnect_while_queued_aborts_before_any_token():
    llm = FakeAsyncLLM(step_time=STEP, max_batch_size=1)
    with running_server(llm) as (base, state):
        with httpx2.Client(base_url=base, timeout=30) as busy_client:
            busy = busy_client.build_request("POST", "/v1/completions", json={"prompt": "busy", "max_tokens": 60, "stream": True})
            response = busy_client.send(busy, stream=True)
            with pytest.raises(httpx2.ReadTimeout):
                httpx2.post(base + "/v1/completions", json={"prompt": "queued", "max_tokens": 5}, timeout=0.3)
            wait_until(lambda: llm.num_aborted == 1 and state.queued == 0, what="the queued request aborted")
            assert llm.stats().num_waiting == 0
            response.close()
        wait_until(lambda: llm.stats().num_blocks_free == llm.num_blocks, what="blocks freed")
        llm.check_integrity()
