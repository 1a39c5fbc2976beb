"""The two ways a benchmark feeds requests: straight into an `AsyncLLM` (offline) or through the HTTP
server's streaming completions endpoint (online), timing every token as it arrives.

Offline, requests go in as fast as the engine takes them (up to `concurrency` in flight; None = all).
Online, they start either `concurrency` at a time or at Poisson arrivals of `rate` per second, as
`vllm bench serve` does. Alongside, the engine's KV-cache usage and running-sequence count are sampled
(engine stats offline, the server's /metrics online): what an FP8 KV cache buys at a fixed memory budget
shows up as more sequences held at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time

from quantlab.engine.bench_workload import BenchRequest, RequestTiming
from quantlab.engine.sampling import SamplingParams

KV_SAMPLE_S = 0.25


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="req", disable=not enabled, leave=False)

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _params(req: BenchRequest) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=req.output_len, ignore_eos=True)


async def _sample(read, into: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        value = await read()
        if value is not None:
            into.append(value)
        try:
            await asyncio.wait_for(stop.wait(), KV_SAMPLE_S)
        except TimeoutError:
            pass


async def _sweep_point(one, reqs: list[BenchRequest], concurrency: int | None, rate: float | None, seed: int,
                       read_engine, label: str, progress: bool) -> tuple[list[RequestTiming], float, list]:
    """Run `one(i, req, timing)` for every request under the concurrency cap and the arrival process."""
    gate = asyncio.Semaphore(concurrency or len(reqs))
    rng = random.Random(seed)
    timings = [RequestTiming(len(r.prompt_token_ids), r.output_len) for r in reqs]
    bar, samples, stop = _Progress(len(reqs), label, progress), [], asyncio.Event()
    sampler = asyncio.create_task(_sample(read_engine, samples, stop))

    async def run(i: int, req: BenchRequest) -> None:
        async with gate:
            timings[i].start = time.perf_counter()
            try:
                await one(req, timings[i])
            except Exception as e:  # a failed request is reported, not fatal to the sweep
                timings[i].error = f"{type(e).__name__}: {e}"
            bar.done()

    t0 = time.perf_counter()
    tasks = []
    for i, req in enumerate(reqs):
        tasks.append(asyncio.create_task(run(i, req)))
        if rate is not None and rate != float("inf") and i + 1 < len(reqs):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    stop.set()
    await sampler
    bar.close()
    return timings, duration, samples


async def run_offline(async_llm, reqs: list[BenchRequest], concurrency: int | None, seed: int, progress: bool):
    """Every request through `async_llm.generate`; returns (timings, duration_s, (kv usage, running) samples)."""

    ids = itertools.count()

    async def one(req: BenchRequest, t: RequestTiming) -> None:
        seen, last = 0, None
        async for out in async_llm.generate(req.prompt_token_ids, _params(req), f"bench-{next(ids)}"):
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            last = _count(t, now, last, n - seen)
            seen = n
        t.e2e = time.perf_counter() - t.start

    async def read_engine():
        stats = async_llm.stats()
        return stats.kv_cache_usage, stats.num_running

    label = f"offline c={concurrency or 'all'}"
    return await _sweep_point(one, reqs, concurrency, None, seed, read_engine, label, progress)


def _count(t: RequestTiming, now: float, last: float | None, new: int) -> float | None:
    """Record `new` tokens arriving together at `now` (the first one sets TTFT); returns the last-token time."""
    if new <= 0:
        return last
    if t.ttft is None:
        t.ttft = now - t.start
    else:
        t.itl.extend([(now - last) / new] * new)
    t.output_tokens += new
    return now


async def run_online(url: str, model: str, reqs: list[BenchRequest], concurrency: int | None, rate: float | None,
                     seed: int, progress: bool):
    """Every request as a streaming POST /v1/completions to `url`; returns (timings, duration_s, samples)."""
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency or len(reqs), max_keepalive_connections=concurrency or 64)
    async with httpx2.AsyncClient(base_url=url, timeout=httpx2.Timeout(None, connect=30), limits=limits) as client:

        async def one(req: BenchRequest, t: RequestTiming) -> None:
            body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "stream": True,
                    "ignore_eos": True, "temperature": 1.0, "stream_options": {"include_usage": True}}
            last, usage = None, None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk["choices"]:
                        last = _count(t, time.perf_counter(), last, 1)
            t.e2e = time.perf_counter() - t.start
            if usage is not None:
                t.output_tokens = usage["completion_tokens"]

        async def read_engine():
            try:
                text = (await client.get("/metrics")).text
            except httpx2.TransportError:
                return None
            values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith(("quantlab:kv_cache_usage_perc", "quantlab:num_requests_running"))}
            if len(values) < 2:
                return None
            return values["quantlab:kv_cache_usage_perc"], values["quantlab:num_requests_running"]

        label = f"online c={concurrency or 'all'} rate={rate if rate is not None else 'max'}"
        return await _sweep_point(one, reqs, concurrency, rate, seed, read_engine, label, progress)
