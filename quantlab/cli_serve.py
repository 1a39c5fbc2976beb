"""The serving commands: ``serve`` (the OpenAI-compatible HTTP server) and ``bench`` (offline throughput,
online latency sweeps, the HF baseline). Registered on ``quantlab.cli.app`` by importing this module;
each parses flags, calls one function and lets ``_user_errors`` turn a ``QuantlabError`` into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import _user_errors, app
from .errors import QuantlabError


def _list(text: str | None, kind, flag: str) -> tuple:
    if text is None:
        return ()
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise QuantlabError(f"{flag} takes comma-separated numbers (got {text!r})") from None


def _levels(text: str | None) -> tuple[int | None, ...]:
    """--concurrency: comma-separated integers, `all` meaning no limit (the default)."""
    return tuple(None if c.strip() == "all" else _list(c, int, "--concurrency")[0]
                 for c in (text or "all").split(",") if c.strip())


# The engine's run-time settings (engine.config.RuntimeOptions, no rebuild needed), shared by serve and bench.
KvFraction = Annotated[float | None, typer.Option(help="Share of the GPU memory left after weights and activations that the KV pool takes (default 0.9).")]
KvMib = Annotated[float | None, typer.Option(help="A fixed KV pool size in MiB instead of that share (e.g. BF16 against FP8 KV at one budget).")]
MaxBatch = Annotated[int | None, typer.Option(help="Fewer sequences per step than the engine's baked max_batch_size.")]
MaxTokens = Annotated[int | None, typer.Option(help="Fewer tokens per step (the chunked-prefill budget) than the baked max_num_tokens.")]
Policy = Annotated[str | None, typer.Option(help="Admission: guaranteed_no_evict (default) or max_utilization (preempts under pressure).")]
PrefixCaching = Annotated[bool, typer.Option(help="Reuse the KV blocks of identical prompt prefixes.")]
Eager = Annotated[bool, typer.Option(help="Decode without CUDA graphs (debugging; slower).")]


def _runtime(kv_fraction, kv_mib, max_batch_size, max_num_tokens, policy, prefix_caching, eager) -> dict:
    """The RuntimeOptions fields the command line changes from the engine's defaults."""
    given = {"kv_cache_memory_fraction": kv_fraction, "kv_cache_mib": kv_mib, "max_batch_size": max_batch_size,
             "max_num_tokens": max_num_tokens, "policy": policy,
             "enable_prefix_caching": None if prefix_caching else False, "enforce_eager": True if eager else None}
    return {k: v for k, v in given.items() if v is not None}


@app.command()
@_user_errors
def serve(
    engine_dir: Annotated[Path, typer.Argument(help="An engine directory made by `quantlab build`.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_queue: Annotated[int, typer.Option(help="Sequences waiting for a first token before new requests get 429.")] = 1024,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds a request may take before it gets 408.")] = None,
    grace_period: Annotated[float, typer.Option(help="Seconds SIGTERM waits for in-flight requests.")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(help="Model name in the API (default: the engine dir's name).")] = None,
    kv_cache_memory_fraction: KvFraction = None,
    kv_cache_mib: KvMib = None,
    max_batch_size: MaxBatch = None,
    max_num_tokens: MaxTokens = None,
    policy: Policy = None,
    enable_prefix_caching: PrefixCaching = True,
    enforce_eager: Eager = False,
) -> None:
    """Serve an engine over an OpenAI-compatible HTTP API until SIGTERM (then drain and exit 0)."""
    from .engine.async_llm import AsyncLLM
    from .engine.server import ServerSettings
    from .engine.server import serve as run_server

    settings = ServerSettings(host=host, port=port, max_queue=max_queue, request_timeout=request_timeout,
                              grace_period=grace_period, model_name=served_model_name)
    options = _runtime(kv_cache_memory_fraction, kv_cache_mib, max_batch_size, max_num_tokens, policy,
                       enable_prefix_caching, enforce_eager)
    run_server(AsyncLLM.from_engine_dir(engine_dir, **options), settings)


@app.command()
@_user_errors
def bench(
    engine_dir: Annotated[Path, typer.Argument(help="The engine measured (with --url: the engine that server runs).")],
    mode: Annotated[str, typer.Option(help="offline (straight into the engine) or online (through the HTTP server).")] = "offline",
    url: Annotated[str | None, typer.Option(help="Online: a running server; default: start one on a free loopback port.")] = None,
    num_requests: Annotated[str, typer.Option(help="Requests per sweep point: one count for all, or comma-separated, one per --concurrency or --request-rate value (e.g. 8,64,256,1024).")] = "256",
    input_len: Annotated[int, typer.Option(help="Prompt tokens per request (mean when --range-ratio > 0).")] = 512,
    output_len: Annotated[int, typer.Option(help="Generated tokens per request (mean when --range-ratio > 0).")] = 128,
    range_ratio: Annotated[float, typer.Option(help="Spread lengths uniformly by this fraction around the means.")] = 0.0,
    concurrency: Annotated[str | None, typer.Option(help="Comma-separated in-flight limits to sweep, e.g. 1,16,64,256 (default: unbounded).")] = None,
    request_rate: Annotated[str | None, typer.Option(help="Online: comma-separated Poisson rates (req/s; inf = all at once) to sweep.")] = None,
    baseline: Annotated[str | None, typer.Option(help="hf: the same requests through transformers generate, side by side.")] = None,
    hf_model: Annotated[str | None, typer.Option(help="Model for the HF baseline (default: the engine's source).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts, lengths and arrivals.")] = 0,
    output: Annotated[str | None, typer.Option(help="Directory for results.json, table.txt and the plot.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    kv_cache_memory_fraction: KvFraction = None,
    kv_cache_mib: KvMib = None,
    max_batch_size: MaxBatch = None,
    max_num_tokens: MaxTokens = None,
    policy: Policy = None,
    enable_prefix_caching: PrefixCaching = True,
    enforce_eager: Eager = False,
) -> None:
    """Measure an engine: offline throughput or online latency/throughput sweeps, optionally against HF."""
    from .engine.bench import BenchConfig, run_bench
    from .engine.bench_report import format_table, requests_text
    from .engine.bench_workload import Workload

    cfg = BenchConfig(mode=mode, engine_dir=str(engine_dir), url=url, concurrency=_levels(concurrency),
                      workload=Workload(input_len, output_len, range_ratio, seed),
                      num_requests=_list(num_requests, int, "--num-requests"),
                      request_rates=_list(request_rate, float, "--request-rate"), baseline=baseline,
                      hf_model=hf_model, output=output, overwrite=overwrite, progress=not quiet,
                      engine_options=_runtime(kv_cache_memory_fraction, kv_cache_mib, max_batch_size, max_num_tokens,
                                              policy, enable_prefix_caching, enforce_eager))
    report = run_bench(cfg)
    typer.echo(f"{mode} bench of {engine_dir} on {report['device']}, {report['date']}: "
               f"{requests_text(cfg.num_requests)}, {input_len} in / {output_len} out")
    typer.echo(format_table(report))
    if output is not None:
        typer.echo(f"wrote {output}/results.json, table.txt, throughput_latency.png")
