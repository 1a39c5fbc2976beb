"""W4A16 launch configurations: the fixed per-shape heuristics and the candidates the build-time tuner times.

``w4a16.tune`` times ``candidate_configs`` on the target GPU per M bucket; the engine stores the winners in
``LinearSpec.kernel_config`` and ``config_for`` reads them back at run time (no tuning at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .timing import tuned_for


@dataclass(frozen=True)
class Config:
    """One launch configuration (what ``tune`` picks per M bucket and the engine stores)."""

    path: str = "triton"  # or "dequant": dequantize once, then cuBLAS
    block_m: int = 16  # 1, 2 or 4: the GEMV form over that many rows; 16 or more: the tensor-core/tiled form
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def heuristic_config(m: int, n: int, k: int, sms: int = 132) -> Config:
    """A fixed per-shape choice used when no tuned config is stored."""
    if m <= 16:
        block_n, block_k = 64, 256 if k >= 2048 else 128
        tiles = triton.cdiv(n, block_n)
        split = max(1, min(triton.cdiv(2 * sms, tiles), k // (4 * block_k) or 1, 16))
        return Config("triton", 16, block_n, block_k, split, 4, 4)
    return Config("dequant")  # from M = 17 on: the tiled kernel measured 0.1-0.4x BF16 at M = 64-256


def candidate_configs(m: int, n: int, k: int) -> list[Config]:
    """What ``tune`` times for an M bucket (the heuristic's choice is always among them).

    Pruned by what won on the H200 (bench/results/kernels_h200*.json, 2026-12-02, six Llama-3-8B/70B
    shapes): at M = 1 the GEMV form always beat the tensor-core form, and from M = 64 on (run 3, with the
    split-K tiles among the candidates) dequantize-then-cuBLAS always beat every tiled form, so those
    losers are no longer compiled and timed at build time. At M = 2-4 the multi-row GEMV form (2 or 4 rows a
    program; M = 3 runs as 4) is timed beside the tensor-core form.
    """
    base = heuristic_config(m, n, k)
    out = []
    if m <= 4:  # the GEMV form over 1, 2 or 4 rows, in tiles that compile without spills (sm_90 SASS read offline)
        rows = triton.next_power_of_2(m)
        out += [Config("triton", rows, bn, 256, sp, 4, 3) for bn in (64, 32) for sp in (1, 2, 4, 8)]
    if 1 < m <= 16:  # the tensor-core form; the split is a run-time argument: 2 compilations cover each set of 8
        out += [Config("triton", 16, bn, 256, sp, 4, 4) for bn in (64, 128) for sp in (1, 2, 4, 8)]
    if m > 16:
        out = [Config("dequant")]
    return out + [base] if base not in out else out


def config_for(configs: dict | None, m: int, n: int, k: int) -> Config:
    """The stored config of the smallest tuned bucket >= ``m`` (else the largest), or the heuristic."""
    cfg = tuned_for(configs, m)
    return heuristic_config(m, n, k) if cfg is None else Config(**cfg)
