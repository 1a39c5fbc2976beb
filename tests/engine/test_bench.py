"""quantlab bench: workloads are exact and reproducible, offline/online sweeps count every token and time
every request, each sweep point runs its own number of requests, the HF baseline runs the same prompts,
and the report is written whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engine_helpers import build
from quantlab.cli import app
from quantlab.engine.bench import BenchConfig, run_bench
from quantlab.engine.bench_workload import BenchError, RequestTiming, Workload, percentile, summarize


@pytest.fixture(scope="module")
def engine_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    build(tiny_model[0], out, max_batch_size=8, max_num_tokens=64)
    return out


def test_workload_is_reproducible_and_lengths_stay_in_range():
    w = Workload(20, 10, range_ratio=0.5, seed=3)
    reqs = w.requests(200, 256, {1})
    assert reqs == w.requests(200, 256, {1}) and reqs != Workload(20, 10, 0.5, seed=4).requests(200, 256, {1})
    assert w.requests(50, 256, {1}) == reqs[:50], "a smaller sweep point runs a prefix of a larger one's requests"
    assert all(10 <= len(r.prompt_token_ids) <= 30 and 5 <= r.output_len <= 15 for r in reqs)
    assert not any(1 in r.prompt_token_ids for r in reqs), "special ids are never drawn"
    assert {len(r.prompt_token_ids) for r in Workload(7, 3).requests(5, 256, set())} == {7}


def test_bad_workload_or_config_is_one_sentence():
    with pytest.raises(BenchError, match="--input-len"):
        Workload(0, 1)
    with pytest.raises(BenchError, match="online"):
        BenchConfig("offline", "x", Workload(1, 1), request_rates=(2.0,))
    with pytest.raises(BenchError, match=r"--num-requests must be integers >= 1 \(got '8,0'\)"):
        BenchConfig("offline", "x", Workload(1, 1), concurrency=(1, 2), num_requests=(8, 0))


@pytest.mark.parametrize(("sweep", "counts", "message"), [
    ({"concurrency": (1, 16, 64, 256)}, (8, 64), "--num-requests has 2 values but --concurrency has 4; give one count "
                                                 "per sweep point, or one count for all of them"),
    ({"concurrency": (4,), "request_rates": (1.0, 4.0, float("inf"))}, (8, 64, 256, 1024),
     "--num-requests has 4 values but --request-rate has 3; "),
])
def test_num_requests_list_must_match_the_sweep(sweep, counts, message):
    with pytest.raises(BenchError) as e:
        BenchConfig("online", "x", Workload(1, 1), num_requests=counts, **sweep)
    assert str(e.value).startswith(message)
    BenchConfig("online", "x", Workload(1, 1), num_requests=counts[:1], **sweep)  # one count serves every point


def test_percentile_matches_numpy():
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_summary_counts_tokens_and_throughput():
    t = [RequestTiming(10, 4, ttft=0.1, e2e=0.4, output_tokens=4, itl=[0.1, 0.1, 0.1]),
         RequestTiming(6, 4, error="boom")]
    s = summarize(t, 2.0, [(0.5, 3), (0.25, 7)])
    assert (s["completed"], s["failed"], s["output_tok_per_s"], s["total_tok_per_s"]) == (1, 1, 2.0, 7.0)
    assert s["tpot_p50_s"] == pytest.approx(0.1) and (s["kv_usage_max"], s["kv_usage_mean"], s["running_max"]) == (0.5, 0.375, 7)


def test_offline_bench_times_every_token_and_writes_the_report(engine_dir, tmp_path):
    out = tmp_path / "report"
    cfg = BenchConfig("offline", str(engine_dir), Workload(8, 6, seed=1), num_requests=(12,), concurrency=(None, 4),
                      output=str(out), progress=False)
    report = run_bench(cfg)
    assert [p["label"] for p in report["points"]] == ["c=all", "c=4"]
    for p in report["points"]:
        s = p["summary"]
        assert (s["completed"], s["failed"], s["output_tokens"], s["input_tokens"]) == (12, 0, 72, 96)
        assert all(r["ttft"] > 0 and len(r["itl"]) == 5 and r["e2e"] >= r["ttft"] for r in p["requests"])
        assert s["kv_usage_max"] is not None and 0 <= s["running_max"] <= 8  # the engine's max_batch_size
    assert report["engine"]["num_kv_blocks"] > 0 and report["engine"]["kv_cache_dtype"] == "bf16"
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["num_requests"] == [12] and len(saved["points"][1]["requests"]) == 12
    assert [p["num_requests"] for p in saved["points"]] == [12, 12]
    assert "c=4" in (out / "table.txt").read_text()
    assert (out / "throughput_latency.png").stat().st_size > 0
    with pytest.raises(BenchError, match="exists"):
        run_bench(cfg)


def test_offline_sweep_points_each_run_their_own_number_of_requests(engine_dir, tmp_path):
    cfg = BenchConfig("offline", str(engine_dir), Workload(5, 4, seed=1), num_requests=(3, 10), concurrency=(1, 4),
                      output=str(tmp_path / "r"), progress=False)
    report = run_bench(cfg)
    assert [(p["label"], p["num_requests"], len(p["requests"])) for p in report["points"]] == [("c=1", 3, 3), ("c=4", 10, 10)]
    assert [(p["summary"]["completed"], p["summary"]["output_tokens"]) for p in report["points"]] == [(3, 12), (10, 40)]
    table = (tmp_path / "r" / "table.txt").read_text().splitlines()
    assert table[0].split()[:2] == ["point", "requests"] and [row.split()[1] for row in table[2:]] == ["3", "10"]


def test_online_bench_through_a_started_server(engine_dir):
    cfg = BenchConfig("online", str(engine_dir), Workload(6, 5, range_ratio=0.4, seed=2), num_requests=(4, 10),
                      concurrency=(3,), request_rates=(200.0, float("inf")), progress=False)
    report = run_bench(cfg)
    assert [p["label"] for p in report["points"]] == ["rate=200/s c=3", "rate=inf/s c=3"]
    reqs = cfg.workload.requests(10, 256, {1})
    for p, n in zip(report["points"], (4, 10)):
        s = p["summary"]
        assert p["num_requests"] == n and s["completed"] == n
        assert s["failed"] == 0 and s["output_tokens"] == sum(r.output_len for r in reqs[:n])
        assert s["ttft_p99_s"] >= s["ttft_p50_s"] > 0 and s["itl_p50_s"] > 0


def test_hf_baseline_runs_the_same_requests(engine_dir):
    cfg = BenchConfig("offline", str(engine_dir), Workload(5, 4, seed=0), num_requests=(6, 2), concurrency=(3, 2),
                      baseline="hf", progress=False)
    report = run_bench(cfg)
    assert [(r["batch_size"], r["completed"], r["output_tokens"], r["input_tokens"]) for r in report["baseline"]] == [
        (3, 6, 24, 30), (2, 2, 8, 10)], "each HF row runs its sweep point's requests"
    for row, point in zip(report["baseline"], report["points"]):
        assert row["engine_speedup"] == pytest.approx(point["summary"]["output_tok_per_s"] / row["output_tok_per_s"])


def test_bench_cli_prints_the_table(engine_dir):
    r = CliRunner().invoke(app, ["bench", str(engine_dir), "--num-requests", "4", "--input-len", "4",
                                 "--output-len", "3", "--concurrency", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "out tok/s" in r.output and "c=2" in r.output
    for flag, value in (("--request-rate", "fast"), ("--concurrency", "1,many"), ("--num-requests", "8,lots")):
        bad = CliRunner().invoke(app, ["bench", str(engine_dir), flag, value])
        assert bad.exit_code == 2 and flag in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["bench", str(engine_dir), "--concurrency", "1,16,64", "--num-requests", "8,64"])
    assert bad.exit_code == 2 and "--num-requests has 2 values but --concurrency has 3" in bad.output
    assert "Traceback" not in bad.output


def test_online_bench_against_a_running_server_url(engine_dir):
    from quantlab.engine.async_llm import AsyncLLM
    from quantlab.engine.server import background_server

    cfg = dict(mode="online", engine_dir=str(engine_dir), workload=Workload(4, 3), num_requests=(4,), concurrency=(2,),
               progress=False)
    with background_server(AsyncLLM.from_engine_dir(engine_dir)) as (url, _):
        report = run_bench(BenchConfig(url=url, **cfg))
    assert report["points"][0]["summary"]["output_tokens"] == 12 and report["points"][0]["summary"]["failed"] == 0
    with pytest.raises(BenchError, match="no OpenAI-compatible server answers"):
        run_bench(BenchConfig(url="http://127.0.0.1:9", **cfg))


def test_engine_is_freed_before_the_hf_baseline_loads(engine_dir, monkeypatch):
    # On a GPU the engine's KV pool takes most of the memory: HF ran out of it (H200, 2026-12-02) while a
    # local variable still held the shut-down engine.
    import gc
    import weakref

    from quantlab.engine import bench_hf
    from quantlab.engine.async_llm import AsyncLLM

    made, alive = [], []
    real = AsyncLLM.from_engine_dir.__func__

    def tracked(cls, path, **overrides):
        llm = real(cls, path, **overrides)
        made.append(weakref.ref(llm.engine))
        return llm

    def fake_run_hf(*args, **kwargs):
        gc.collect()
        alive.append([ref() is not None for ref in made])
        return {"output_tok_per_s": 1.0}

    monkeypatch.setattr(AsyncLLM, "from_engine_dir", classmethod(tracked))
    monkeypatch.setattr(bench_hf, "run_hf", fake_run_hf)
    run_bench(BenchConfig("offline", str(engine_dir), Workload(8, 4), concurrency=(2,), num_requests=(4,),
                          baseline="hf", progress=False))
    assert alive == [[False]]


def test_warm_up_runs_other_prompts_before_the_sweep(engine_dir, monkeypatch):
    # The first Triton call compiles; an untimed warm-up keeps that out of the first point's TTFT, and uses
    # other prompts so the prefix cache gives the timed requests nothing.
    from quantlab.engine import bench

    calls = []
    real = bench.run_offline

    async def recording(llm, reqs, *args):
        calls.append(reqs)
        return await real(llm, reqs, *args)

    monkeypatch.setattr(bench, "run_offline", recording)
    run_bench(BenchConfig("offline", str(engine_dir), Workload(8, 6), concurrency=(2,), num_requests=(3,), progress=False))
    warm, timed = calls
    assert len(warm) == 2 and all(r.output_len <= 4 for r in warm) and len(timed) == 3
    assert not {tuple(r.prompt_token_ids) for r in warm} & {tuple(r.prompt_token_ids) for r in timed}


def test_engine_options_reach_the_engine_the_bench_loads(engine_dir, tmp_path):
    """--kv-cache-mib fixes the pool (blocks = budget / block bytes), --max-batch-size caps the sequences running
    at once; both are recorded in the report. A bad value or an option for a server at --url is one sentence."""
    from quantlab.engine.config import EngineConfig

    cfg = EngineConfig.load(engine_dir)
    m = cfg.model
    block_bytes = 2 * m.num_layers * cfg.limits.tokens_per_block * m.num_kv_heads * m.head_dim * 4  # float32 KV
    r = CliRunner().invoke(app, ["bench", str(engine_dir), "--num-requests", "6", "--input-len", "4", "--output-len", "3",
                                 "--kv-cache-mib", str(40 * block_bytes / 2**20), "--max-batch-size", "2", "--quiet",
                                 "--output", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b" / "results.json").read_text())
    assert report["engine"]["num_kv_blocks"] == 40
    assert report["settings"]["engine_options"] == {"kv_cache_mib": 40 * block_bytes / 2**20, "max_batch_size": 2}
    assert report["points"][0]["summary"]["running_max"] <= 2
    bad = CliRunner().invoke(app, ["bench", str(engine_dir), "--policy", "greedy", "--num-requests", "2"])
    assert bad.exit_code == 2 and "policy must be one of" in bad.output and "Traceback" not in bad.output
    with pytest.raises(BenchError, match="--kv-cache-mib set the engine this command loads"):
        BenchConfig(mode="online", engine_dir=str(engine_dir), workload=Workload(4, 3), url="http://127.0.0.1:9",
                    engine_options={"kv_cache_mib": 8.0})
