"""THE load test: 1,000 requests through the HTTP server at high concurrency, a quarter of the clients
leaving mid-stream at random points, some requests malformed on purpose. Afterwards: no error but the
intended rejections, every KV block back in the pool, the counters equal to what was sent, and the server
still answering."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx2
import pytest

from engine_helpers import build
from fake_async_llm import FakeAsyncLLM
from quantlab.engine.server import ServerSettings
from server_harness import running_server, scrape, wait_until

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 1000, 64, 8
# Leaving clients ask for many more tokens than they wait for, so that their disconnects land while the
# sequence still runs (an abort) on a loaded CI machine too, not after it already finished by length.
LEAVE_MAX_TOKENS = 64
# (body, expected status): each malformed kind the server must refuse with a named reason.
MALFORMED = [
    ({"prompt": [1, 2], "temperature": "warm"}, 400),
    ({"prompt": [1, 2], "max_tokns": 4}, 400),
    ({"prompt": [1, 2], "top_p": 0}, 400),
    ({"prompt": [7] * 400}, 400),
    ({"prompt": []}, 400),
    ({"prompt": [1, 2], "model": "someone-else"}, 404),
    ("{\"prompt\": [1, 2", 400),
]


def _plan(rng: random.Random) -> list[dict]:
    """Every request's kind, body and expectations, drawn up front so the expected counters are exact."""
    plan = []
    for i in range(NUM_REQUESTS):
        roll = rng.random()
        prompt = [rng.randrange(1, 199) for _ in range(rng.randrange(1, 24))]
        if roll < 0.06:
            body, status = MALFORMED[i % len(MALFORMED)]
            plan.append({"kind": "malformed", "body": body, "status": status, "path": "/v1/completions"})
        elif roll < 0.31:
            body = {"prompt": prompt, "max_tokens": LEAVE_MAX_TOKENS, "stream": True, "ignore_eos": True}
            plan.append({"kind": "leave", "body": body, "after": rng.randrange(1, MAX_TOKENS), "prompt_len": len(prompt)})
        else:
            stream, chat, n = rng.random() < 0.5, rng.random() < 0.3, 2 if rng.random() < 0.1 else 1
            body = {"max_tokens": MAX_TOKENS, "stream": stream, "n": n, "seed": i, "ignore_eos": True}
            if stream:
                body["stream_options"] = {"include_usage": True}
            if chat:
                body["messages"] = [{"role": "user", "content": "".join(chr(97 + t % 26) for t in prompt)}]
            else:
                body["prompt"] = prompt
            plan.append({"kind": "complete", "body": body, "n": n, "prompt_len": None if chat else len(prompt),
                         "path": "/v1/chat/completions" if chat else "/v1/completions"})
    return plan


async def _one(client: httpx2.AsyncClient, req: dict) -> dict:
    if req["kind"] == "malformed":
        body = req["body"]
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
        r = await client.post(req["path"], **kw)
        return {"status": r.status_code, "error": r.json().get("error")}
    if req["kind"] == "leave":
        async with client.stream("POST", "/v1/completions", json=req["body"]) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= req["after"]:
                    break  # leaving the block closes the connection mid-stream
        return {"status": r.status_code}
    if not req["body"]["stream"]:
        r = await client.post(req["path"], json=req["body"])
        data = r.json()
        return {"status": r.status_code, "usage": data.get("usage"),
                "finish": [c["finish_reason"] for c in data.get("choices", [])]}
    events = []
    async with client.stream("POST", req["path"], json=req["body"]) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    chunks = [json.loads(e) for e in events[:-1]]
    return {"status": r.status_code, "done": events[-1] == "[DONE]", "usage": chunks[-1].get("usage"),
            "finish": [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]}


async def _drive(base: str, plan: list[dict]) -> list[dict]:
    limits = httpx2.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx2.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        async def run(req):
            async with gate:
                return await _one(client, req)
        return await asyncio.gather(*[run(req) for req in plan])


@pytest.fixture(params=["tiny-engine", "fake-engine"])
def engine(request):
    """(AsyncLLM, its block-pool integrity check): the real engine of a tiny random Llama, and the test
    double with 1 ms steps (denser interleaving of disconnects and engine steps)."""
    if request.param == "fake-engine":
        llm = FakeAsyncLLM(num_blocks=512, max_batch_size=32, step_time=0.001)
        return llm, llm.check_integrity
    from quantlab.engine.async_llm import AsyncLLM

    out = request.getfixturevalue("tmp_path") / "engine"
    build(request.getfixturevalue("tiny_model")[0], out, max_batch_size=32, max_num_tokens=256)
    llm = AsyncLLM.from_engine_dir(out)
    return llm, llm.engine.block_manager.check_integrity


def test_thousand_requests_with_disconnects_and_malformed_leave_nothing_behind(engine):
    llm, check_integrity = engine
    settings = ServerSettings(max_queue=4 * CONCURRENCY, grace_period=2)
    plan = _plan(random.Random(0))
    with running_server(llm, settings) as (base, state):
        start = time.monotonic()
        results = asyncio.run(_drive(base, plan))
        elapsed = time.monotonic() - start

        for req, res in zip(plan, results):
            if req["kind"] == "malformed":
                assert res["status"] == req["status"] and res["error"]["message"], (req, res)
            elif req["kind"] == "leave":
                assert res["status"] == 200, res
            else:
                assert res["status"] == 200 and res["finish"] == ["length"] * req["n"], (req, res)
                assert res.get("done", True) and res["usage"]["completion_tokens"] == MAX_TOKENS * req["n"], res
                if req["prompt_len"] is not None:
                    assert res["usage"]["prompt_tokens"] == req["prompt_len"]

        wait_until(lambda: llm.stats().num_running == 0 and llm.stats().num_waiting == 0, timeout=15, what="engine idle")
        check_integrity()
        m = scrape(base)
        assert m["quantlab:kv_cache_usage_perc"] == 0 and llm.stats().num_blocks_free == llm.stats().num_blocks_total

        done = [(q, r) for q, r in zip(plan, results) if q["kind"] == "complete"]
        left = [q for q in plan if q["kind"] == "leave"]
        bad = [q for q in plan if q["kind"] == "malformed"]
        sequences = sum(q["n"] for q, _ in done) + len(left)
        finished = m['quantlab:request_success_total{finished_reason="length"}']
        aborted = m.get('quantlab:request_success_total{finished_reason="abort"}', 0)
        assert finished + aborted == sequences and aborted <= len(left) and aborted > 0
        assert m["quantlab:e2e_request_latency_seconds_count"] == finished
        prompt_tokens = sum(r["usage"]["prompt_tokens"] for _, r in done) + sum(q["prompt_len"] for q in left)
        assert m["quantlab:prompt_tokens_total"] == prompt_tokens
        delivered = sum(r["usage"]["completion_tokens"] for _, r in done)
        assert delivered + len(left) <= m["quantlab:generation_tokens_total"] <= delivered + len(left) * LEAVE_MAX_TOKENS
        for status in (400, 404):
            assert m[f'quantlab:request_rejected_total{{status="{status}"}}'] == sum(q["status"] == status for q in bad)
        assert state.queued == 0

        after = httpx2.post(base + "/v1/completions", json={"prompt": [3, 4], "max_tokens": 2, "ignore_eos": True}, timeout=10)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    assert elapsed < 60, f"1,000 requests took {elapsed:.1f} s"
