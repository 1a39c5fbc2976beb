"""`quantlab bench`: one command for offline throughput and online serving latency, like `vllm bench` /
`trtllm-bench` / genai-perf.

- offline: the workload straight into the engine (`AsyncLLM`), at each `--concurrency` (default: all at
  once, as fast as the engine takes them) -> output tok/s, total tok/s, requests/s, latencies;
- online: the workload through the HTTP server (at `--url`, or one started here on a free loopback port)
  as a sweep of concurrency levels or Poisson request rates -> TTFT, inter-token latency, TPOT, e2e
  p50/p90/p99, throughput, KV-cache usage;
- `--baseline hf`: the same requests through transformers `generate` on the same device, model and dtype
  in the same run, batch size = each concurrency level, so the speed-up is measured side by side.

Every run writes results.json (settings, every request's timings, summaries), table.txt and
throughput_latency.png into `--output`, atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field

from quantlab.atomic import atomic_directory, check_output
from quantlab.engine.bench_drivers import run_offline, run_online
from quantlab.engine.bench_workload import BenchError, Workload, summarize

MODES = ("offline", "online")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Args:
        mode: "offline" or "online".
        engine_dir: the engine measured (online with `url`: the engine that server runs, read for its
            vocabulary so prompts are valid token ids).
        workload: the requests' lengths and seed.
        num_requests: requests per sweep point, one per point or one for all; every point runs the first
            n of the same seeded requests, so a smaller point's prompts are a prefix of a larger one's.
        url: a running server (online); None starts one on a free loopback port.
        concurrency: requests in flight per sweep point; None = unbounded.
        request_rates: online Poisson arrival rates per second (inf = all at once); when given, the sweep
            is over rates (each capped by the single concurrency value, if any).
        baseline: None or "hf".
        hf_model: the transformers model for the baseline (default: the engine's source model).
        output: result directory (None = print only).
        engine_options: ``RuntimeOptions`` overrides for the engine this run loads (not with ``url``).
    """

    mode: str
    engine_dir: str
    workload: Workload
    num_requests: tuple[int, ...] = (256,)
    url: str | None = None
    concurrency: tuple[int | None, ...] = (None,)
    request_rates: tuple[float, ...] = ()
    baseline: str | None = None
    hf_model: str | None = None
    output: str | None = None
    overwrite: bool = False
    progress: bool = True
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise BenchError(f"--mode must be offline or online (got {self.mode!r})")
        if any(c is not None and c < 1 for c in self.concurrency) or not self.concurrency:
            raise BenchError(f"--concurrency must be integers >= 1 (got {self.concurrency})")
        if self.request_rates and self.mode != "online":
            raise BenchError("--request-rate is an online setting; offline feeds requests as fast as the engine takes them")
        if any(not r > 0 for r in self.request_rates):
            raise BenchError(f"--request-rate must be positive (got {self.request_rates})")
        if self.request_rates and len(self.concurrency) > 1:
            raise BenchError("sweep either --concurrency or --request-rate, not both")
        if not self.num_requests or any(not isinstance(n, int) or n < 1 for n in self.num_requests):
            raise BenchError(f"--num-requests must be integers >= 1 (got {','.join(map(str, self.num_requests))!r})")
        swept, points = ("--request-rate", len(self.request_rates)) if self.request_rates else (
            "--concurrency", len(self.concurrency))
        if len(self.num_requests) not in (1, points):
            raise BenchError(f"--num-requests has {len(self.num_requests)} values but {swept} has {points}; give one "
                             "count per sweep point, or one count for all of them")
        if self.url is not None and self.mode != "online":
            raise BenchError("--url is an online setting")
        if self.url is not None and self.engine_options:
            flags = ", ".join("--" + k.replace("_", "-") for k in self.engine_options)
            raise BenchError(f"{flags} set the engine this command loads; the server at --url runs with its own settings")
        if self.baseline not in (None, "hf"):
            raise BenchError(f"--baseline must be hf (got {self.baseline!r})")


def _engine_facts(engine_dir: str) -> dict:
    from quantlab.engine.config import EngineConfig

    cfg = EngineConfig.load(engine_dir)
    return {"vocab_size": cfg.model.vocab_size, "special_ids": set(cfg.model.eos_token_ids) | (
        set() if cfg.model.bos_token_id is None else {cfg.model.bos_token_id}), "device": cfg.target["device"],
            "dtype": cfg.dtype, "kv_cache_dtype": cfg.kv_cache_dtype, "source": cfg.source.get("path"),
            "max_batch_size": cfg.limits.max_batch_size}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def _point(label: str, concurrency, rate, timings, duration, samples) -> dict:
    return {"label": label, "concurrency": concurrency, "request_rate": rate, "num_requests": len(timings),
            "summary": summarize(timings, duration, samples), "requests": [asdict(t) for t in timings]}


def _sweep(cfg: BenchConfig) -> list[tuple[int | None, float | None, int]]:
    """(concurrency, rate, number of requests) of each sweep point."""
    levels = [(cfg.concurrency[0], r) for r in cfg.request_rates] or [(c, None) for c in cfg.concurrency]
    counts = cfg.num_requests * len(levels) if len(cfg.num_requests) == 1 else cfg.num_requests
    return [(c, rate, n) for (c, rate), n in zip(levels, counts)]


def run_bench(cfg: BenchConfig) -> dict:
    """Run the sweep (and the baseline), write the report if `output` is set, and return it."""
    if cfg.output is not None:
        check_output(cfg.output, cfg.overwrite, "bench output ", BenchError)
    facts = _engine_facts(cfg.engine_dir)
    reqs = cfg.workload.requests(max(cfg.num_requests), facts["vocab_size"], facts["special_ids"])
    points = _run_points(cfg, facts, reqs)
    settings = {**{k: v for k, v in asdict(cfg).items() if k != "workload"}, **asdict(cfg.workload)}
    report = {"command": shlex.join(["quantlab", *sys.argv[1:]]), "settings": settings,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": _device_name(facts["device"]), "engine": {k: v for k, v in facts.items() if k != "special_ids"},
              "points": points, "baseline": _baseline(cfg, facts, reqs, points)}
    if cfg.output is not None:
        from quantlab.engine.bench_report import write

        with atomic_directory(cfg.output, cfg.overwrite, "bench output ", BenchError) as tmp:
            write(report, tmp)
    return report


def _run_points(cfg: BenchConfig, facts: dict, reqs) -> list[dict]:
    """Every sweep point through one engine (and server), all stopped on return: a function of its own so
    that no reference to the engine outlives it and the HF baseline gets the GPU memory back."""
    points = []
    with _engine_and_server(cfg, facts) as (llm, url, model, num_blocks):
        facts["num_kv_blocks"] = num_blocks
        for c, rate, n in _sweep(cfg):
            label = (f"c={c or 'all'}" if rate is None else f"rate={rate:g}/s") + ("" if rate is None or c is None else f" c={c}")
            if cfg.mode == "offline":
                timings, duration, samples = asyncio.run(run_offline(llm, reqs[:n], c, cfg.workload.seed, cfg.progress))
            else:
                timings, duration, samples = asyncio.run(run_online(url, model, reqs[:n], c, rate, cfg.workload.seed, cfg.progress))
            points.append(_point(label, c, rate, timings, duration, samples))
    return points


@contextlib.contextmanager
def _engine_and_server(cfg: BenchConfig, facts: dict):
    """(AsyncLLM or None, server URL or None, model name, KV blocks or None if unknown) for the run;
    everything started here is stopped afterwards."""
    if cfg.url is not None:
        import httpx2

        try:
            model = httpx2.get(cfg.url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
        except (httpx2.TransportError, ValueError, KeyError, IndexError) as e:
            raise BenchError(f"no OpenAI-compatible server answers at {cfg.url} ({type(e).__name__})") from None
        yield None, cfg.url.rstrip("/"), model, None
        return
    from quantlab.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_dir(cfg.engine_dir, **cfg.engine_options)
    num_blocks = llm.stats().num_blocks_total
    try:
        _warm_up(llm, cfg, facts)
        if cfg.mode == "offline":
            yield llm, None, llm.model_name, num_blocks
        else:
            from quantlab.engine.server import ServerSettings, background_server

            max_queue = max(cfg.num_requests)
            with background_server(llm, ServerSettings(max_queue=max_queue, grace_period=5.0)) as (url, _):
                yield None, url, llm.model_name, num_blocks
    finally:
        asyncio.run(llm.shutdown())


def _warm_up(llm, cfg: BenchConfig, facts: dict) -> None:
    """A few untimed requests before the first sweep point: the first call of each Triton kernel compiles
    it (on the H200 the first point's TTFT p50 was 2.9 s at 16 concurrent), which is load cost, not serving."""
    from dataclasses import replace

    from quantlab.engine.bench_workload import BenchRequest

    # Other prompts than the timed ones (another seed), so the prefix cache gives the sweep nothing for free.
    other = replace(cfg.workload, seed=cfg.workload.seed + 1)
    reqs = [BenchRequest(r.prompt_token_ids, min(r.output_len, 4))
            for r in other.requests(2, facts["vocab_size"], facts["special_ids"])]
    asyncio.run(run_offline(llm, reqs, None, other.seed, False))


def _baseline(cfg: BenchConfig, facts: dict, reqs, points: list[dict]) -> list[dict]:
    """The HF rows: one per sweep point, over that point's requests, batch size = its concurrency level
    (unbounded -> the engine's batch)."""
    if cfg.baseline is None:
        return []
    import gc

    import torch

    from quantlab.engine.bench_hf import run_hf

    # The engine is shut down, but its weights and KV pool (most of the GPU) are only freed once collected.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = cfg.hf_model or facts["source"]
    if model is None:
        raise BenchError("the engine does not record its source model; name it with --hf-model")
    rows = []
    for p in points:
        batch = p["concurrency"] or facts["max_batch_size"]
        row = run_hf(model, reqs[:p["num_requests"]], batch, facts["device"], facts["dtype"], cfg.progress)
        row["engine_point"] = p["label"]
        row["engine_speedup"] = p["summary"]["output_tok_per_s"] / row["output_tok_per_s"]
        rows.append(row)
    return rows
