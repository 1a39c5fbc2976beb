"""What a benchmark sends: requests of random prompt token ids with fixed or spread lengths, and what it
measures of each one (`RequestTiming`), summarized into throughput and latency percentiles.

Prompts are token ids, not text, so the input length is exact whatever the tokenizer (vLLM's `random`
dataset does the same), and every request asks for exactly its output length (`ignore_eos`), so two
engines or two runs process the same token counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from quantlab.errors import QuantlabError


class BenchError(QuantlabError):
    """A benchmark setting is invalid or its target cannot be reached."""


@dataclass(frozen=True)
class Workload:
    """The requests' shape; lengths are uniform in [len * (1 - range_ratio), len * (1 + range_ratio)] (0 = fixed).
    How many run at each sweep point is `BenchConfig.num_requests`."""

    input_len: int
    output_len: int
    range_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("input_len", "output_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be an integer >= 1 (got {getattr(self, name)!r})")
        if not 0 <= self.range_ratio < 1:
            raise BenchError(f"--range-ratio must be in [0, 1) (got {self.range_ratio})")

    def requests(self, num_requests: int, vocab_size: int, special_ids: set[int]) -> list[BenchRequest]:
        """The requests, the same for the same seed whatever runs them (engine, server or HF baseline).

        They are drawn one after another from one generator, so fewer requests are a prefix of more.
        """
        rng = random.Random(self.seed)
        allowed = [t for t in range(vocab_size) if t not in special_ids]

        def length(mean: int) -> int:
            lo, hi = max(1, round(mean * (1 - self.range_ratio))), max(1, round(mean * (1 + self.range_ratio)))
            return rng.randint(lo, hi)

        out = []
        for _ in range(num_requests):
            n_in, n_out = length(self.input_len), length(self.output_len)
            out.append(BenchRequest([rng.choice(allowed) for _ in range(n_in)], n_out))
        return out


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class RequestTiming:
    """One request's timings in seconds from its own start; `itl` holds the gaps between its tokens."""

    input_len: int
    output_len: int
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(timings: list[RequestTiming], duration: float, samples: list[tuple[float, int]]) -> dict:
    """Throughput over the run's wall time, p50/p90/p99 of TTFT, inter-token latency, TPOT and e2e, and
    the peak and mean of the sampled (KV-cache usage, running sequences)."""
    kv_usage = [kv for kv, _ in samples]
    ok = [t for t in timings if t.error is None]
    out_tokens = sum(t.output_tokens for t in ok)
    in_tokens = sum(t.input_len for t in ok)
    result = {"completed": len(ok), "failed": len(timings) - len(ok), "duration_s": duration,
              "requests_per_s": len(ok) / duration, "output_tok_per_s": out_tokens / duration,
              "total_tok_per_s": (in_tokens + out_tokens) / duration, "input_tokens": in_tokens,
              "output_tokens": out_tokens,
              "kv_usage_max": max(kv_usage, default=None),
              "kv_usage_mean": sum(kv_usage) / len(kv_usage) if kv_usage else None,
              "running_max": max((r for _, r in samples), default=None)}
    series = {"ttft": [t.ttft for t in ok if t.ttft is not None],
              "itl": [g for t in ok for g in t.itl],
              "tpot": [(t.e2e - t.ttft) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1 and t.ttft is not None],
              "e2e": [t.e2e for t in ok if t.e2e is not None]}
    for name, values in series.items():
        for q in (50, 90, 99):
            result[f"{name}_p{q}_s"] = percentile(values, q)
        result[f"{name}_mean_s"] = sum(values) / len(values) if values else None
    return result
