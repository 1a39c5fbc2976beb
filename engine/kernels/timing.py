"""GPU time of a kernel call, as the build-time tuner and bench/kernels.py measure it, the tuners' choice of
the fastest eligible candidate, and M buckets.

Calls are captured in a CUDA graph and replayed, so the time is the GPU's (a decode step replays graphs
too) and not Python's launch overhead, which for a 5-microsecond kernel would be most of a host-timed
call. L2 is kept from serving repeated inputs by rotating over several copies of them (``fns`` holds one
call per copy; together they should exceed the 50 MB L2), as METHOD.md of the device docs advises.
"""

from __future__ import annotations

import statistics

import torch
import triton


def graph_time_ms(fns, target_ms: float = 5.0, most_calls: int = 40, replays: int = 5) -> float:
    """Median milliseconds per call of ``fns`` (callables, run round-robin), replayed from one CUDA graph.

    A graph holds about ``target_ms`` of work (at most ``most_calls`` calls, at least one round).
    """
    for fn in fns:  # compile / autotune / allocate outside the capture
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fns[0]()
    end.record()
    end.synchronize()
    calls = min(most_calls, max(1, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    rounds = max(1, -(-calls // len(fns)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for fn in fns:  # a warm call on the capture stream, as torch's graph docs ask
            fn()
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(rounds):
                for fn in fns:
                    fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(fns)))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int = 50 << 20, most: int = 8) -> int:
    """How many copies of ``nbytes`` of inputs keep a round-robin out of L2 (three times its size)."""
    return max(1, min(most, -(-3 * l2_bytes // max(1, nbytes))))


def m_bucket(m: int) -> int:
    """The power of two >= m (capped at 4096) under which tuned configs are stored."""
    return min(4096, 1 << max(0, (m - 1).bit_length()))


def tuned_for(configs: dict | None, m: int) -> dict | None:
    """The config of the smallest tuned bucket >= ``m``'s (else the largest); None if nothing was tuned."""
    if not configs:
        return None
    buckets = sorted(int(b) for b in configs)
    return configs[str(next((b for b in buckets if b >= m_bucket(m)), buckets[-1]))]


def agrees(run, weight, want: torch.Tensor) -> bool:
    """Whether ``run(weight)`` compiles on this GPU and its product agrees with ``want`` to 1 % in norm (16-bit
    outputs: their rounding and the order of float32 sums are the only differences a candidate may have)."""
    try:
        got = run(weight).float()
    except Exception:  # noqa: BLE001 - a config that does not compile on this GPU is not a candidate
        return False
    return bool(((got - want.float()).norm() <= 1e-2 * want.float().norm()).item())


def fastest(runs, copies, m: int, timings: list | None = None):
    """The config of the fastest of ``runs`` ([(config, run)], ``run(copy)`` one product over one copy of the
    weights) by ``graph_time_ms`` over ``copies``; a run that does not fit this GPU's resources is passed over.
    ``timings``, if given, receives (m, config, milliseconds) of every run timed."""
    timed = []
    for cfg, run in runs:
        try:
            t = graph_time_ms([lambda c=c, run=run: run(c) for c in copies])
        except (triton.runtime.errors.OutOfResources, RuntimeError):
            continue
        timed.append((t, cfg))
        if timings is not None:
            timings.append((m, cfg, t))
    return min(timed, key=lambda tc: tc[0])[1]
