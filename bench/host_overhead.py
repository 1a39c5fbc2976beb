"""Host time of an engine step: the scheduler, block manager, the step's input tensors, sampler bookkeeping,
detokenizer and outputs, with the model's forward replaced by a stub that prepares the inputs and returns
zero logits, so only host work is timed.

At batch 256 a decode step on the H200 took ~55 ms against ~20 ms of device work (docs/performance.md); this
measures, on any machine, how much of a step the host side costs as the batch grows.

    python bench/host_overhead.py ENGINE_DIR --batch 256 --input-len 1000 --output-len 200 [--profile]

ENGINE_DIR is any engine (a tiny one is enough: the forward never runs). Prints ms per step over the
decode steps (prefill steps excluded) and, with --profile, the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch

from quantlab.engine.llm import LLMEngine
from quantlab.engine.runner import ModelRunner
from quantlab.engine.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine_dir")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=512, help="width of the stub's logits")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--through-async", action="store_true",
                    help="feed the requests through AsyncLLM and quantlab bench's offline clients (one process, "
                         "as `quantlab bench` runs) and time every step, prefill included")
    args = ap.parse_args()

    def stub_forward(self, chunks):
        self._prepare(chunks)  # the step's input tensors from Python lists: host work too
        return torch.zeros(sum(1 for c in chunks if c.samples), args.vocab)

    ModelRunner.forward = stub_forward
    # The sampler's tensor math runs on the device on a GPU (asynchronously); on a CPU it would be counted
    # as host time, so it is timed apart and reported separately.
    from quantlab.engine import llm as llm_module

    sampled = [0.0]
    real_sample = llm_module.sample

    def timed_sample(logits, tensors):
        t0 = time.perf_counter()
        out = real_sample(logits, tensors)
        sampled[0] += time.perf_counter() - t0
        return out

    llm_module.sample = timed_sample
    # A KV pool that holds the whole batch (the stub never touches it; only the block manager counts).
    engine = LLMEngine(args.engine_dir, kv_cache_mib=1024)
    if args.through_async:
        return _through_async(engine, args, sampled)
    rng = random.Random(0)
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randrange(3, args.vocab) for _ in range(args.input_len)],
                           # greedy: on a CPU the sampler's tensor math would swamp the Python being measured
                           SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < len(s.prompt_token_ids) for s in engine.scheduler.running):
        engine.step()  # prefill: not timed
    sampled[0] = 0.0
    profile = cProfile.Profile() if args.profile else None
    steps, start = 0, time.perf_counter()
    if profile:
        profile.enable()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    if profile:
        profile.disable()
    seconds = time.perf_counter() - start
    python = seconds - sampled[0]
    print(f"{steps} decode steps at batch {args.batch}: {python / steps * 1e3:.2f} ms of host Python per step, "
          f"plus {sampled[0] / steps * 1e3:.2f} ms of sampler tensor math "
          f"({'profiled, so slower' if profile else 'unprofiled'})")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def _through_async(engine, args, sampled) -> None:
    """Every step of the same workload driven by AsyncLLM's step thread and the bench's asyncio clients."""
    import asyncio

    from quantlab.engine.async_llm import AsyncLLM
    from quantlab.engine.bench_drivers import run_offline
    from quantlab.engine.bench_workload import BenchRequest

    steps = [0]
    real_step = engine.step

    def counted_step():
        steps[0] += 1
        return real_step()

    engine.step = counted_step
    rng = random.Random(0)
    reqs = [BenchRequest([rng.randrange(3, args.vocab) for _ in range(args.input_len)], args.output_len)
            for _ in range(args.batch)]
    llm = AsyncLLM(engine)
    start = time.perf_counter()
    asyncio.run(run_offline(llm, reqs, args.batch, 0, False))
    seconds = time.perf_counter() - start
    asyncio.run(llm.shutdown())
    print(f"{steps[0]} steps (prefill included) at batch {args.batch} through AsyncLLM and the bench clients: "
          f"{(seconds - sampled[0]) / steps[0] * 1e3:.2f} ms of host time per step, plus "
          f"{sampled[0] / steps[0] * 1e3:.2f} ms of sampler tensor math")


if __name__ == "__main__":
    main()
