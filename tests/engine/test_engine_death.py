"""A dead engine is reported, never waited on: once a step raises, every request in flight (streaming,
waiting for its first token, or handed over at that very moment) ends with an error, /health answers 503
naming the cause, and new requests get 503 at once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time

import httpx2
import pytest

from quantlab.engine.async_llm import AsyncLLM
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import EngineDeadError
from server_harness import running_server, wait_until

CAUSE = "injected step failure"
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


def _fail_second_step(llm: AsyncLLM) -> threading.Event:
    """Let the engine run one step (every prompt here gets its first token), then block the next step until
    the returned event is set and raise: the test decides when the engine dies, requests in flight."""
    armed, step, calls = threading.Event(), llm.engine.step, []

    def step_then_fail():
        calls.append(None)
        if len(calls) == 1:
            return step()
        armed.wait(timeout=30)
        raise RuntimeError(CAUSE)

    llm.engine.step = step_then_fail
    return armed


async def _drain(gen) -> list:
    return [out async for out in gen]


def test_async_llm_fails_running_late_and_new_requests_with_engine_dead_error(tiny_engine):
    llm = AsyncLLM.from_engine_dir(tiny_engine)
    armed = _fail_second_step(llm)

    async def main():
        running = llm.generate([5, 6, 7], LONG, "running")
        assert not (await running.__anext__()).finished  # step 1 ran; step 2 now waits for `armed`
        late = asyncio.ensure_future(_drain(llm.generate([8, 9], LONG, "late")))
        await asyncio.sleep(0.1)  # "late" sits in the inbox: the thread is inside step 2
        armed.set()
        for pending in (running.__anext__(), late, _drain(llm.generate([4], LONG, "after"))):
            with pytest.raises(EngineDeadError, match=CAUSE):
                await asyncio.wait_for(pending, 5)

    try:
        asyncio.run(main())
        assert CAUSE in llm.dead_reason and llm.dead_reason.endswith("restart the server")
    finally:
        armed.set()
        asyncio.run(llm.shutdown())


def test_server_reports_a_dead_engine_and_ends_its_requests(tiny_engine, caplog):
    caplog.set_level(logging.ERROR, logger="quantlab.engine")
    llm = AsyncLLM.from_engine_dir(tiny_engine)
    armed = _fail_second_step(llm)
    try:
        with running_server(llm) as (url, _), concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert httpx2.get(url + "/health", timeout=5).status_code == 200
            body = {"prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True}
            with httpx2.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
                assert r.status_code == 200
                events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
                assert json.loads(next(events))["choices"], "the first token arrived before the failure"
                waiting = pool.submit(httpx2.post, url + "/v1/completions", timeout=10,
                                      json={"prompt": [8, 9], "max_tokens": 5, "ignore_eos": True})
                wait_until(lambda: not llm._inbox.empty(), timeout=5, what="the second request handed to the engine")
                armed.set()
                rest = list(events)  # a stream left waiting would hit the 10 s read timeout here
            assert rest[-1] == "[DONE]"
            streamed = json.loads(rest[-2])["error"]
            assert streamed["code"] == 503 and CAUSE in streamed["message"]
            assert waiting.result().status_code == 503 and CAUSE in waiting.result().json()["error"]["message"]

            health = httpx2.get(url + "/health", timeout=5)
            assert health.status_code == 503
            err = health.json()["error"]
            assert err["type"] == "service_unavailable_error" and CAUSE in err["message"]
            assert err["message"].count(". ") == 0 and "Traceback" not in health.text, "one sentence, no traceback"

            t0 = time.monotonic()
            for stream in (False, True):
                r = httpx2.post(url + "/v1/completions", timeout=5,
                                json={"prompt": [5], "max_tokens": 3, "stream": stream})
                assert r.status_code == 503 and CAUSE in r.json()["error"]["message"]
            assert time.monotonic() - t0 < 5
    finally:
        armed.set()
    assert any(rec.exc_info and str(rec.exc_info[1]) == CAUSE for rec in caplog.records), "traceback in the log"
