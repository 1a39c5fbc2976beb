"""Split-K in one launch, shared by the W4A16 and GEMV kernels: the split that finishes last sums the partials.

A batch-1 product has too few output tiles to fill the GPU, so its K range is split over several programs.
Instead of a second launch that adds their partial sums, each split stores its partial and counts itself in
at its tile's arrival counter; the one that arrives last adds every partial in split order (a fixed order,
so the result is deterministic) and resets the counter. The counters live in one zeroed buffer per device
(``locks``), reused by every launch and by CUDA-graph replays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOCKS: dict[torch.device, torch.Tensor] = {}


def locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K arrival counters, zero between calls (the last split resets its tile's): allocated once per
    device and grown when a launch has more tiles, so CUDA-graph replays reuse the same buffer. Launches
    that share them must not overlap, i.e. split-K calls run on one stream per device (the engine's)."""
    have = _LOCKS.get(device)
    if have is None or have.numel() < tiles:
        _LOCKS[device] = have = torch.zeros(max(tiles, 1 << 16), device=device, dtype=torch.int32)
    return have


@triton.jit
def sum_splits(acc, part_ptr, lock_ptr, tile, mask, pid_k, SPLIT_K, SPLIT_STRIDE):
    """(the sum of every split's ``acc`` in split order, whether this program arrived last).

    Only the last program's sum is complete; it alone may write the output. ``part_ptr + s * SPLIT_STRIDE +
    tile`` is split s's partial of this tile (float32 or int32, as ``acc``); ``lock_ptr`` is the tile's counter.
    """
    # acq_rel: the partial is visible before the count; the last split reads the partials through L2 (.cg),
    # not a stale L1.
    tl.store(part_ptr + pid_k * SPLIT_STRIDE + tile, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before the (cumulative) release below
    last = tl.atomic_add(lock_ptr, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        acc = tl.zeros(acc.shape, acc.dtype)
        for s in range(SPLIT_K):
            acc += tl.load(part_ptr + s * SPLIT_STRIDE + tile, mask=mask, other=0, cache_modifier=".cg")
        tl.atomic_xchg(lock_ptr, 0)
    return acc, last
