"""GPTQ (Frantar et al. 2023): Hessian-aware column-by-column rounding with error compensation.

Per Linear, GPTQ sees ``H = 2/n * sum_t x_t x_t^T`` over the calibration tokens and rounds the weight one
input column at a time, in the order of Algorithm 1 of the paper: each column is rounded with
``quantlab.formats``, and its rounding error, scaled by the inverse Hessian, is pushed onto the
columns not yet rounded so the layer's output moves as little as possible. Blocks of ``block_size``
columns are updated lazily (the paper's section 3.2), which changes the memory traffic, not the result.

The pipeline calls ``accumulate_hessian`` on each Linear's inputs, then ``gptq_quantize`` per Linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import formats, observers
from . import gptq_kernel
from ..context import forward_hooks
from ..errors import CalibrationError
from ..recipe.schema import WeightScheme
from ..recipe.stages import GPTQParams

logger = logging.getLogger(__name__)

# A Hessian that is not positive definite after dampening is retried with 10x the dampening,
# this many times (so up to 10**4 x the recipe's value) before calibration stops.
_MAX_DAMPING_RETRIES = 4


@dataclass(frozen=True, slots=True)
class GPTQStats:
    """What one ``gptq_quantize`` call did.

    Attributes:
        damping: the dampening fraction finally used (``params.dampening`` unless retries raised it).
        num_damping_retries: how many times the dampening was multiplied by 10 because the Hessian
            was not positive definite (0 normally).
        num_dead_inputs: input features whose Hessian diagonal was 0 (never active in calibration);
            their weights are set to 0.
        output_mse: ``tr((W - Q) H (W - Q)^T) / (2 * out)`` with the undamped Hessian: the mean squared
            error of the layer's outputs over the calibration tokens and output features.
    """

    damping: float
    num_damping_retries: int
    num_dead_inputs: int
    output_mse: float


def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of Linear inputs to the running Hessian ``H = 2/n * sum_t x_t x_t^T``.

    H is kept as a running mean, so its scale does not depend on how many batches were seen, and it
    is accumulated in float32 whatever ``x``'s dtype.

    Args:
        h: the Hessian so far, float32 [in, in] on ``x``'s device, or None before the first batch. It
            is updated in place (an [in, in] copy per batch would double the memory of wide layers).
        n: number of tokens already in ``h``.
        x: inputs [..., in]; every leading index is one token.

    Returns:
        (h, n + number of tokens in x).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = n + x.shape[0]
    if x.shape[0] == 0:
        return h, n
    h.mul_(n / total).addmm_(x.T, x, alpha=2.0 / total)
    return h, total


def _upper_inverse_cholesky(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising the damping until H is PD.

    The factor's rows are exactly the inverse-Hessian rows Algorithm 1 needs after the earlier columns
    have been eliminated (the paper's section 3.3), so no per-column inverse update is done.
    """
    mean_diag = torch.diag(h).mean()
    base = dampening if dampening > 0 else 1e-3  # so that a recipe's dampening 0 can still be retried
    for retry in range(_MAX_DAMPING_RETRIES + 1):
        fraction = dampening if retry == 0 else base * 10**retry
        damped = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (fraction * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if retry:
                    logger.warning("GPTQ: the Hessian is not positive definite with dampening %g; raised it "
                                   "to %g (x%g)", dampening, fraction, fraction / base)
                return upper, fraction, retry
    raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with dampening {fraction:g} "
                           f"({_MAX_DAMPING_RETRIES} retries at 10x each); the calibration inputs are degenerate")


def _expand_columns(qp: formats.QParams, groups: torch.Tensor | None, rows: int, n: int) -> formats.QParams:
    """Per-column parameters [rows, n]: column p takes group ``groups[p]`` of ``qp`` (None: ``qp`` has
    one scale per row, or one for the tensor, shared by every column)."""
    def expand(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.reshape(rows, -1) if t.numel() > 1 else t.reshape(1, 1)
        return t[:, groups] if groups is not None else t.expand(rows, n)

    return formats.QParams(qp.fmt, expand(qp.scale), expand(qp.zero_point), qp.global_scale)


def _column_slice(qp: formats.QParams, i1: int, i2: int) -> formats.QParams:
    zp = None if qp.zero_point is None else qp.zero_point[:, i1:i2]
    return formats.QParams(qp.fmt, qp.scale[:, i1:i2], zp, qp.global_scale)


class _Rounded(NamedTuple):
    """The loop's result: q [out, in] in the original column order and the ranges used."""

    q: torch.Tensor
    amin: torch.Tensor
    amax: torch.Tensor
    global_amax: torch.Tensor
    damping: float
    num_damping_retries: int
    num_dead_inputs: int


def _round_columns(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, params: GPTQParams,
                   global_amax: torch.Tensor | None = None) -> _Rounded:
    """Algorithm 1 with lazy block updates; see ``gptq_quantize`` for the contract."""
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)
    num_out, num_in = w.shape
    if h.shape != (num_in, num_in):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    if not torch.isfinite(h).all():
        raise CalibrationError("GPTQ: the Hessian contains NaN or inf; the layer's calibration inputs were not finite")

    # Inputs never active in calibration: their weights cannot affect the outputs seen, so they are set
    # to 0 (and so do not widen any range), and H_ii = 1 keeps H invertible (reference implementation).
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # nvfp4's global scale comes from the weight before any GPTQ update and never moves.
    global_amax = w.abs().max() if global_amax is None else global_amax.to(device=w.device, dtype=torch.float32)

    grouped = scheme.granularity == "group"
    if grouped and params.act_order and not params.static_groups:
        # Groups formed in processing order need a weight_g_idx, which quantlab checkpoints never store;
        # the recipe loader refuses this combination, so only a direct call can reach it.
        raise ValueError("GPTQ: act_order with group granularity needs static_groups=True")
    gs = scheme.group_size if grouped else None
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if params.act_order else None
    # Static ranges: per tensor/channel always; per group with act_order + static_groups, from the
    # original column order so groups stay contiguous. Otherwise each group's range is chosen from the
    # current (error-updated) weights when its first column is reached.
    dynamic_groups = grouped and not params.act_order
    if dynamic_groups:
        amin = torch.zeros(num_out, num_in // gs, dtype=torch.float32, device=w.device)
        amax = torch.zeros_like(amin)
    else:
        amin, amax = (r.float() for r in observers.weight_range(w, scheme))
    # Scales are computed once per group (here, or when a dynamic group starts) and each column is then
    # rounded elementwise against its group's: the same numbers formats.quantize derives from the range.
    qp = None if dynamic_groups else formats.qparams(scheme.format, amin, amax, global_amax)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]

    hinv, damping, retries = _upper_inverse_cholesky(h, params.dampening)
    del h
    if not dynamic_groups:
        # Each processing position's static parameters, gathered once: position p uses its column's
        # group (original order under act_order), or the row's channel / the tensor's one scale.
        groups = (perm if perm is not None else torch.arange(num_in, device=w.device)) // gs if grouped else None
        col_qp = _expand_columns(qp, groups, num_out, num_in)

    q = torch.zeros_like(w)
    for i1 in range(0, num_in, params.block_size):
        i2 = min(i1 + params.block_size, num_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        q1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2].contiguous()
        if not dynamic_groups:
            gptq_kernel.round_columns(w1, hinv1, q1, err1, 0, _column_slice(col_qp, i1, i2))
        # Dynamic groups: a group's range is taken from the current weights when its first column is
        # reached, so the block is rounded one group segment at a time.
        starts = sorted({i1, *range(-(-i1 // gs) * gs, i2, gs)}) if dynamic_groups else []
        for a, b in zip(starts, starts[1:] + [i2]):
            if a % gs == 0:
                # The group's current weights: in this block, w1; past it, w still lacks this block's
                # updates so far, which are added here (the reference reads the stale w instead).
                i = a - i1
                current = w1[:, i:i + gs]
                if a + gs > i2:
                    rest = w[:, i2:a + gs] - err1[:, :i] @ hinv[i1:a, i2:a + gs]
                    current = torch.cat([current, rest], dim=1)
                lo, hi = observers.weight_range(current, scheme)
                amin[:, a // gs], amax[:, a // gs] = lo[:, 0], hi[:, 0]
                group_qp = formats.qparams(scheme.format, lo, hi, global_amax)
            gptq_kernel.round_columns(w1, hinv1, q1, err1, a - i1, _expand_columns(group_qp, None, num_out, b - a))
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return _Rounded(q, amin, amax, global_amax, damping, retries, int(dead.sum()))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, params: GPTQParams,
                  global_amax: torch.Tensor | None = None) -> tuple[formats.QTensor, GPTQStats]:
    """Quantize a Linear weight with GPTQ.

    Ranges: per tensor and per channel they come from the whole weight before the loop (the scheme's
    observer); per group, the observer sees the group's columns of the current, error-updated weight
    when its first column is reached, as in the reference implementation, except that here "current"
    includes the updates from earlier columns of the same lazy block (the reference reads them before
    those), so the result does not depend on ``block_size``. With act_order and
    static_groups, every group's range is taken from the original weight before reordering instead,
    so groups stay contiguous. Dead inputs (H_ii = 0) get weight 0, and ranges ignore them.

    Args:
        weight: [out, in] in any float dtype, on CPU or CUDA; all math is float32 on its device.
        hessian: [in, in] from ``accumulate_hessian``; not modified.
        scheme: the weight scheme (any format ``formats`` knows; groups must divide ``in``).
        params: GPTQ parameters.
        global_amax: for nvfp4, the amax behind the global scale (default: max|weight|; a fused
            Linear's shards pass their common one).

    Returns:
        (qt, stats): ``formats.dequantize(qt)`` is the GPTQ weight exactly.

    Raises:
        ValueError: act_order with group granularity and ``static_groups=False`` (groups in processing
            order would need a ``weight_g_idx``; the recipe loader refuses it).
        CalibrationError: the Hessian is not finite, or not positive definite even after raising the
            dampening 10x ``_MAX_DAMPING_RETRIES`` times (when a retry succeeds, a warning is logged).
    """
    r = _round_columns(weight, hessian, scheme, params, global_amax)
    qt = observers.quantize_weight(r.q, scheme, amin=r.amin, amax=r.amax, global_amax=r.global_amax)
    # The loop already rounded every column onto these grids, so re-encoding must reproduce it.
    assert torch.equal(formats.dequantize(qt), r.q), "GPTQ: re-encoding the rounded weight changed it"
    delta = weight.detach().float() - r.q
    h = hessian.detach().to(device=delta.device, dtype=torch.float32)
    output_mse = float(((delta @ h) * delta).sum()) / (2 * weight.shape[0])
    return qt, GPTQStats(r.damping, r.num_damping_retries, r.num_dead_inputs, output_mse)


def _hessians(ctx, names: list[str]) -> dict[str, torch.Tensor]:
    """Each named target's input Hessian over one pass of every calibration batch, which stops where the
    last of them has run."""
    acc: dict[str, list] = {name: [None, 0] for name in names}

    def hook(_module, args, _out, name):
        acc[name][0], acc[name][1] = accumulate_hessian(acc[name][0], acc[name][1], args[0].detach())

    with forward_hooks((ctx.targets[n], lambda m, a, o, n=n: hook(m, a, o, n)) for n in names):
        ctx.run(until=names)
    return {name: h for name, (h, _) in acc.items()}


def _split_rows(qt: formats.QTensor, sizes: list[int]) -> list[formats.QTensor]:
    """Row blocks of a per-channel or group-wise QTensor (scales are per row; a global scale is shared)."""
    parts = zip(qt.codes.split(sizes), qt.scale.split(sizes),
                qt.zero_point.split(sizes) if qt.zero_point is not None else [None] * len(sizes))
    return [formats.QTensor(qt.fmt, c, s, z, qt.global_scale, qt.group_size, qt.per_tensor) for c, s, z in parts]


def apply(ctx, params: GPTQParams) -> dict[str, formats.QTensor]:
    """Pipeline adapter: accumulate each stage's input Hessian over the calibration batches, then run
    GPTQ on the stage's Linears (stages: ``LayerContext.stages``, in execution order).

    Linears with one input (q/k/v; gate/up) share one Hessian, and those with the same per-row weight
    scheme are rounded in one call on their stacked rows: GPTQ treats rows independently, so this
    changes nothing but the number of column steps. With ``params.true_sequential`` (see
    ``GPTQParams``), after a stage is rounded its Linears' weights are overwritten with their
    quantized values so the next stage's Hessian sees the quantized stage's outputs; the pipeline
    swaps these Linears for ``QuantLinear``s afterwards, so the float weights are not needed again.

    Returns:
        local Linear name -> QTensor.
    """
    stages = ctx.stages
    global_amax = {name: ctx.global_amax(name) for name in ctx.targets}  # before any weight is overwritten
    hessians = {} if params.true_sequential else _hessians(ctx, [stage[0] for stage in stages])
    out = {}
    for stage in stages:
        h = _hessians(ctx, stage[:1])[stage[0]] if params.true_sequential else hessians.pop(stage[0])
        batches: dict[WeightScheme, list[str]] = {}
        for name in stage:
            scheme = ctx.schemes[name].weights
            # A per-tensor scale would be shared by the stacked rows, so those Linears go alone.
            batches.setdefault(scheme if scheme.granularity != "tensor" else name, []).append(name)
        for names in batches.values():
            scheme = ctx.schemes[names[0]].weights
            weights = [ctx.targets[n].weight.detach().float() for n in names]
            amax = global_amax[names[0]]
            if amax is not None:
                amax = torch.stack([global_amax[n] for n in names]).max()
            qweight, stats = gptq_quantize(torch.cat(weights), h, scheme, params, amax)
            if stats.num_damping_retries:
                ctx.note(f"{', '.join(names)}: Hessian not positive definite, dampening raised to {stats.damping:g}")
            for name, part in zip(names, _split_rows(qweight, [w.shape[0] for w in weights])):
                out[name] = part
        if params.true_sequential:
            with torch.no_grad():
                for name in stage:
                    ctx.targets[name].weight.copy_(formats.dequantize(out[name], ctx.targets[name].weight.dtype))
        del h
    return out
