"""Where one decode step's time goes: host phases, GPU kernels, and the GPU's idle share of the step.

At 256 concurrent sequences of ~1,500 tokens an FP8 Llama-3-8B engine took 52-59 ms a decode step on the
H200 while its kernels, timed alone, add up to about 20 ms, and the host work measured on a CPU
(bench/host_overhead.py) explains only ~6 ms (docs/performance.md). This script settles it on the GPU:

1. fills the engine with ``--batch`` sequences of ``--context`` prompt tokens and prefills them (untimed);
2. times ``--steps`` plain decode steps (the real step time, nothing added);
3. times the same number of steps with a device synchronization around each phase (scheduler, input
   tensors, the forward or CUDA-graph replay, LM head, sampling tensors, sampler, scheduler update,
   detokenize/outputs), so each phase's wall time includes its own GPU work;
4. runs the steps under ``torch.profiler`` and sums the GPU kernels by name, per step, beside the step's
   wall time, so GPU idle time (host-bound gaps) shows as the difference.

    python bench/profile_step.py ENGINE_DIR --batch 256 --context 1500 --steps 20 --out step.json [--trace t.json.gz] [--eager]

``--eager`` drops the engine's CUDA graphs, so the forward's kernels run (and show) one by one as launched
from Python. On a CPU (``--device``-less engine built for the CPU) the same code runs as a dry run: no GPU
kernels, the profiler's table lists CPU operators.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import random
import time
from pathlib import Path

import torch

from quantlab.engine import llm as llm_module
from quantlab.engine.llm import LLMEngine
from quantlab.engine.sampling import SamplingParams


def fill(engine: LLMEngine, batch: int, context: int, new_tokens: int, temperature: float) -> None:
    """Add ``batch`` requests of ``context`` random prompt tokens and run until every one is prefilled."""
    rng = random.Random(0)
    vocab = engine.runner.config.model.vocab_size
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(3, vocab) for _ in range(context)],
                           SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True))
    sched = engine.scheduler
    while sched.num_waiting or any(s.num_computed_tokens < len(s.prompt_token_ids) for s in sched.running):
        engine.step()


def _sync(engine: LLMEngine):
    dev = engine.runner.device
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def step_times(engine: LLMEngine, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` decode steps, as the engine runs them."""
    sync, out = _sync(engine), []
    sync()
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t0)
    return out


def phase_times(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Mean milliseconds per step of each phase, each bracketed by device synchronizations.

    Phases nest as the engine calls them: ``runner.forward`` includes ``runner._prepare`` (the step's input
    tensors) and ``model.logits`` (the LM head); ``sample`` runs after it. The synchronizations make the
    phases add up to more than a plain step, whose GPU work overlaps the host's.
    """
    sync = _sync(engine)
    total: dict[str, float] = collections.defaultdict(float)
    targets = [(engine.scheduler, "schedule"), (engine.runner, "_prepare"), (engine.runner, "forward"),
               (engine.runner.model, "logits"), (llm_module.SamplingTensors, "from_seqs"), (llm_module, "sample"),
               (engine.scheduler, "update"), (engine, "_postprocess")]
    restore = []
    for owner, name in targets:
        real = getattr(owner, name)
        label = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

        def timed(*a, _real=real, _label=label, **k):
            sync()
            t0 = time.perf_counter()
            r = _real(*a, **k)
            sync()
            total[_label] += time.perf_counter() - t0
            return r

        restore.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, staticmethod(timed) if isinstance(owner, type) else timed)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total["step (synchronized phases)"] = time.perf_counter() - t0
    finally:
        for owner, name, had, original in restore:
            if had:  # a module's function or a class's method: put the original back
                setattr(owner, name, original)
            else:  # an instance attribute hid the class's method: remove it
                delattr(owner, name)
    return {k: v / steps * 1e3 for k, v in total.items()}


def kernel_table(engine: LLMEngine, steps: int, trace: Path | None, top: int = 30) -> dict:
    """GPU kernels (or, on a CPU, operators) by name over ``steps`` profiled steps: ms per step and calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = _sync(engine)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = time.perf_counter() - t0
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by_name[e.name][0] += e.device_time_total
                by_name[e.name][1] += 1
        if not by_name:  # a torch whose event list keeps kernels only under their CPU operators
            for e in prof.key_averages():
                if e.self_device_time_total > 0:
                    by_name[e.key] = [e.self_device_time_total, e.count]
    else:
        for e in prof.key_averages():
            by_name[e.key] = [e.self_cpu_time_total, e.count]
    busy_us = sum(v[0] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    if trace is not None:
        raw = trace.with_suffix("") if trace.suffix == ".gz" else trace
        prof.export_chrome_trace(str(raw))
        if trace.suffix == ".gz":
            trace.write_bytes(gzip.compress(raw.read_bytes()))
            raw.unlink()
    return {"what": "GPU kernels" if cuda else "CPU operators (self time; dry run)",
            "wall_ms_per_step": wall / steps * 1e3, "busy_ms_per_step": busy_us / steps / 1e3,
            "rows": [{"name": n[:160], "ms_per_step": t / steps / 1e3, "calls_per_step": c / steps,
                      "share": t / busy_us if busy_us else 0.0} for n, (t, c) in rows[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine_dir", type=Path)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1500, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per measurement")
    ap.add_argument("--temperature", type=float, default=1.0, help="as `quantlab bench` samples (0 = greedy)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs: the forward's kernels one by one")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace", type=Path, help="also write the profiler's Chrome trace (.json or .json.gz)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    engine = LLMEngine(args.engine_dir)
    load = time.perf_counter() - t0
    if args.eager:
        engine.runner.graphs = {}
    # Enough tokens for three measurements plus warm-up; every sequence stays in decode throughout.
    fill(engine, args.batch, args.context, 3 * args.steps + 8, args.temperature)
    step_times(engine, 3)  # warm-up: first decode steps compile the sampler's fused noise and Triton kernels
    running = len(engine.scheduler.running)
    plain = step_times(engine, args.steps)
    phases = phase_times(engine, args.steps)
    kernels = kernel_table(engine, args.steps, args.trace)
    r = engine.runner
    res = {
        "command": "python bench/profile_step.py " + " ".join(
            [str(args.engine_dir), f"--batch {args.batch}", f"--context {args.context}", f"--steps {args.steps}",
             f"--temperature {args.temperature}"] + (["--eager"] if args.eager else [])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if r.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "load_seconds": load, "running_sequences": running,
        "cuda_graph": bool(r.graphs) and running <= max(r.graphs, default=0),
        "step_ms": {"median": sorted(plain)[len(plain) // 2] * 1e3, "min": min(plain) * 1e3, "max": max(plain) * 1e3},
        "phases_ms_synchronized": phases,
        "kernels": kernels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    k = kernels
    print(f"{running} sequences, context ~{args.context}: step {res['step_ms']['median']:.2f} ms (median), "
          f"{k['what']} busy {k['busy_ms_per_step']:.2f} of {k['wall_ms_per_step']:.2f} ms per profiled step")
    for name, ms in phases.items():
        print(f"  {name:40s} {ms:8.2f} ms")
    for row in k["rows"][:12]:
        print(f"  {row['ms_per_step']:8.3f} ms  x{row['calls_per_step']:6.1f}  {row['name'][:90]}")


if __name__ == "__main__":
    main()
