"""GPTQ: beats RTN on correlated inputs, equals a plain transcription of the paper, act-order and
group layouts, exact encoding, degenerate Hessians, and the identity-Hessian limit."""

from __future__ import annotations

import logging

import pytest
import torch

from quantlab import formats, observers
from quantlab.algorithms.gptq import GPTQParams, _round_columns, accumulate_hessian, gptq_quantize
from quantlab.errors import CalibrationError
from quantlab.recipe.schema import WeightScheme

SCHEMES = {
    "int4_g32": WeightScheme("int4", "group", 32),
    "int4_g64": WeightScheme("int4", "group", 64),
    "int4_asym_g128": WeightScheme("int4_asym", "group", 128),
    "int4_channel": WeightScheme("int4", "channel"),
    "int4_asym_channel": WeightScheme("int4_asym", "channel"),
    "int8_channel": WeightScheme("int8", "channel"),
    "nvfp4": WeightScheme("nvfp4", "group", 16),
    "mxfp4": WeightScheme("mxfp4", "group", 32),
}
INT4_CHANNEL = SCHEMES["int4_channel"]


def correlated_inputs(seed: int, num_tokens: int, num_in: int = 128, channel_scales: torch.Tensor | None = None):
    """Two token sets [num_tokens, num_in] from one distribution: mixed Gaussians (x = z @ A) with a few
    outlier channels, optionally times per-channel scales. Returns (calibration, held-out)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(num_in, num_in, generator=g) / num_in**0.5
    outliers = torch.randperm(num_in, generator=g)[:3]

    def sample() -> torch.Tensor:
        x = torch.randn(num_tokens, num_in, generator=g) @ mixing
        x[:, outliers] *= 8.0
        return x if channel_scales is None else x * channel_scales

    return sample(), sample()


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """||X W^T - X Q^T||^2."""
    return float(((x @ (w - q).T) ** 2).sum())


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return accumulate_hessian(None, 0, x)[0]


def reference_gptq(w: torch.Tensor, h: torch.Tensor, dampening: float) -> torch.Tensor:
    """The paper's algorithm as plainly as possible: per-channel int4 (min-max), no lazy blocks, no
    act order, no Cholesky trick. After rounding column j, its error times row j of H^-1 is subtracted
    from the remaining columns, and j is eliminated from H^-1 (OBS, Frantar et al. eq. 3). float64."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    amax = w.abs().amax(dim=1, keepdim=True).float()
    h += dampening * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = formats.quantize_dequantize(w[:, j:j + 1].float(), "int4", amax=amax)[:, 0].double()
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv -= hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q.float()


def test_hessian_running_mean_does_not_depend_on_batching():
    x = torch.randn(3, 10, 16)
    h, n = None, 0
    for batch in x:
        h, n = accumulate_hessian(h, n, batch)
    flat = x.reshape(-1, 16)
    assert n == 30
    torch.testing.assert_close(h, 2.0 / 30 * flat.T @ flat)
    assert accumulate_hessian(None, 0, x.to(torch.bfloat16))[0].dtype == torch.float32


@pytest.mark.parametrize("name", ["int4_g32", "int4_g64", "int4_asym_g128", "nvfp4", "mxfp4"])
def test_gptq_output_error_at_most_0p8_of_rtn_on_correlated_inputs(name):
    # Checked on held-out tokens. Measured GPTQ/RTN ratios over 4 seeds (seed 0 used here is the worst):
    # held-out 0.49-0.69, calibration set 0.46-0.64.
    scheme = SCHEMES[name]
    x, x_test = correlated_inputs(0, 2048)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    qt, stats = gptq_quantize(w, hessian_of(x), scheme, GPTQParams(block_size=32))
    q = formats.dequantize(qt)
    rtn = formats.dequantize(observers.quantize_weight(w, scheme))
    assert output_error(x_test, w, q) <= 0.8 * output_error(x_test, w, rtn)
    # stats.output_mse is the calibration-set output error per token and output feature.
    assert stats.output_mse == pytest.approx(output_error(x, w, q) / (2048 * 32), rel=1e-4)


def test_gptq_matches_plain_transcription_of_the_paper():
    x, _ = correlated_inputs(2, 64, num_in=16)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    h = hessian_of(x)
    expected = reference_gptq(w, h, dampening=0.01)
    for block_size in (1, 3, 16):
        qt, _ = gptq_quantize(w, h, INT4_CHANNEL, GPTQParams(block_size=block_size, dampening=0.01))
        torch.testing.assert_close(formats.dequantize(qt), expected, rtol=0, atol=1e-6)


def test_block_size_does_not_change_groupwise_result_even_when_groups_straddle_blocks():
    # Block 5 splits groups of 32 across blocks: a group's range must still see its current weights.
    x, _ = correlated_inputs(4, 256)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    h = hessian_of(x)
    for act_order in (False, True):
        results = [_round_columns(w, h, SCHEMES["int4_g32"], GPTQParams(block_size=b, act_order=act_order)).q
                   for b in (5, 32, 128)]
        for q in results[1:]:
            torch.testing.assert_close(q, results[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["int4_g32", "int4_asym_g128", "nvfp4", "mxfp4"])
def test_act_order_never_worse_than_5pct_on_varying_channel_scales(name):
    # Measured act-order / plain ratios over 5 seeds: 0.62-0.89.
    g = torch.Generator().manual_seed(6)
    scales = torch.logspace(-1.5, 1.5, 128)[torch.randperm(128, generator=g)]
    x, x_test = correlated_inputs(7, 512, channel_scales=scales)
    w = torch.randn(32, 128, generator=g)
    h = hessian_of(x)
    plain = formats.dequantize(gptq_quantize(w, h, SCHEMES[name], GPTQParams())[0])
    ordered = formats.dequantize(gptq_quantize(w, h, SCHEMES[name], GPTQParams(act_order=True))[0])
    assert output_error(x_test, w, ordered) <= 1.05 * output_error(x_test, w, plain)


def test_static_groups_keep_rtn_ranges_and_contiguous_groups():
    scales = torch.logspace(-1.5, 1.5, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(8))]
    x, _ = correlated_inputs(9, 256, channel_scales=scales)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(10))
    scheme = SCHEMES["int4_g32"]
    qt, stats = gptq_quantize(w, hessian_of(x), scheme, GPTQParams(act_order=True, static_groups=True))
    # The group ranges are those of the original weight, i.e. RTN's, group k = columns [32k, 32k+32).
    rtn = observers.quantize_weight(w, scheme)
    torch.testing.assert_close(qt.scale, rtn.scale, rtol=0, atol=0)
    q = formats.dequantize(qt)
    step = qt.scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(q / step, torch.round(q / step))
    assert (q / step).abs().max() <= 8


def test_act_order_with_dynamic_groups_is_refused():
    """Groups formed in processing order would need a weight_g_idx, which no quantlab checkpoint stores."""
    x, _ = correlated_inputs(12, 256)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(13))
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(w, hessian_of(x), SCHEMES["int4_g32"], GPTQParams(act_order=True, static_groups=False))


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("params", [GPTQParams(block_size=32), GPTQParams(act_order=True)], ids=["plain", "static"])
def test_qtensor_decodes_exactly_to_the_rounded_weight(name, params):
    x, _ = correlated_inputs(14, 256)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(15))
    h = hessian_of(x)
    qt, _ = gptq_quantize(w, h, SCHEMES[name], params)
    assert torch.equal(formats.dequantize(qt), _round_columns(w, h, SCHEMES[name], params).q)


def test_dead_and_duplicated_inputs_are_handled_without_retry(caplog):
    x, _ = correlated_inputs(16, 256)
    x[:, 5] = 0.0             # never active: dead input
    x[:, 7] = x[:, 6]         # duplicated: H is singular, dampening makes it PD
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(17))
    with caplog.at_level(logging.WARNING, logger="quantlab.algorithms.gptq"):
        qt, stats = gptq_quantize(w, hessian_of(x), SCHEMES["int4_g32"], GPTQParams())
    q = formats.dequantize(qt)
    assert stats.num_dead_inputs == 1 and stats.num_damping_retries == 0 and not caplog.records
    assert torch.isfinite(q).all() and torch.equal(q[:, 5], torch.zeros(16))


def test_non_positive_definite_hessian_retries_with_10x_dampening_and_warns(caplog):
    x, _ = correlated_inputs(18, 256, num_in=32)
    h = hessian_of(x).double()
    evals, evecs = torch.linalg.eigh(h)
    evals[0] = -0.05 * torch.diag(h).mean()  # 1% dampening cannot fix this, 10% can
    h = (evecs * evals) @ evecs.T
    h = ((h + h.T) / 2).float()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(19))
    with caplog.at_level(logging.WARNING, logger="quantlab.algorithms.gptq"):
        qt, stats = gptq_quantize(w, h, INT4_CHANNEL, GPTQParams(dampening=0.01))
    assert stats.num_damping_retries == 1 and stats.damping == pytest.approx(0.1)
    assert len(caplog.records) == 1 and "x10" in caplog.records[0].getMessage()
    assert torch.isfinite(formats.dequantize(qt)).all()


@pytest.mark.parametrize("hessian", [-torch.eye(8), torch.full((8, 8), float("nan"))], ids=["negative", "nan"])
def test_hopeless_hessian_raises_calibration_error(hessian):
    with pytest.raises(CalibrationError, match="GPTQ"):
        gptq_quantize(torch.randn(4, 8), hessian, INT4_CHANNEL, GPTQParams())


@pytest.mark.parametrize("name", ["int4_channel", "int4_asym_channel", "int8_channel", "int4_g32", "nvfp4", "mxfp4"])
def test_identity_hessian_reduces_to_rtn(name):
    # With H = I no error is propagated, so every column is rounded on its own: RTN's codes and scales.
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(20))
    scheme = SCHEMES[name]
    qt, _ = gptq_quantize(w, torch.eye(128), scheme, GPTQParams(block_size=32))
    rtn = observers.quantize_weight(w, scheme)
    assert torch.equal(qt.codes, rtn.codes) and torch.equal(qt.scale, rtn.scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["int4_g32", "nvfp4"])
def test_cuda_matches_cpu(name):
    x, _ = correlated_inputs(22, 256)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(23))
    h = hessian_of(x)
    params = GPTQParams(act_order=True, static_groups=False)
    cpu = formats.dequantize(gptq_quantize(w, h, SCHEMES[name], params)[0])
    qt, _ = gptq_quantize(w.cuda(), h.cuda(), SCHEMES[name], params)
    assert qt.codes.is_cuda
    # Different float summation order may flip a rare rounding decision.
    assert (formats.dequantize(qt).cpu() != cpu).float().mean() < 0.01


class _Branchy(torch.nn.Module):
    """x -> a(x), c(x) (one shared input) -> b(relu(a(x)) + c(x)): two execution stages."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + self.c(x))


def _branchy_context(batches: list[torch.Tensor]):
    from quantlab.context import LayerContext
    from quantlab.recipe.schema import SchemeGroup

    layer = _Branchy()
    group = SchemeGroup(targets=("Linear",), weights=SCHEMES["int4_g32"])
    targets = {n: layer.get_submodule(n) for n in ("a", "c", "b")}
    ctx = LayerContext("toy", layer, targets, {n: group for n in targets}, [], list(batches), [{} for _ in batches])
    ctx.run_and_trace()
    return ctx


def test_execution_stages_group_linears_by_shared_input_in_call_order():
    ctx = _branchy_context([torch.randn(16, 64)])
    assert ctx.stages == [["a", "c"], ["b"]]


def test_run_until_stops_each_batch_once_the_named_modules_ran():
    ctx = _branchy_context([torch.randn(16, 64), torch.randn(16, 64)])
    calls = []
    handle = ctx.layer.b.register_forward_pre_hook(lambda *_: calls.append("b"))
    assert ctx.run(until=["a", "c"]) == [] and calls == []
    assert len(ctx.run()) == 2 and calls == ["b", "b"]
    handle.remove()


def test_true_sequential_takes_later_hessians_from_quantized_earlier_stages():
    from quantlab.algorithms import gptq

    batches = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = GPTQParams(true_sequential=True)
    ctx = _branchy_context(batches)
    float_layer = _Branchy()
    got = gptq.apply(ctx, params)

    # By hand: a and c from the float inputs, then b from the layer with a and c quantized.
    with torch.no_grad():
        x = torch.cat(batches)
        qa, _ = gptq_quantize(float_layer.a.weight, hessian_of(x), SCHEMES["int4_g32"], params)
        qc, _ = gptq_quantize(float_layer.c.weight, hessian_of(x), SCHEMES["int4_g32"], params)
        b_in = torch.relu(x @ formats.dequantize(qa).T + float_layer.a.bias) + x @ formats.dequantize(qc).T + float_layer.c.bias
        qb, _ = gptq_quantize(float_layer.b.weight, hessian_of(b_in), SCHEMES["int4_g32"], params)
        b_float_in = float_layer.a(x).relu() + float_layer.c(x)
        qb_float, _ = gptq_quantize(float_layer.b.weight, hessian_of(b_float_in), SCHEMES["int4_g32"], params)
    for name, expected in (("a", qa), ("c", qc)):
        assert torch.equal(got[name].codes, expected.codes)
    torch.testing.assert_close(formats.dequantize(got["b"]), formats.dequantize(qb), rtol=0, atol=1e-6)
    # The property is not vacuous: b's result from one float pass differs.
    one_pass = gptq.apply(_branchy_context(batches), GPTQParams(true_sequential=False))
    assert torch.equal(one_pass["b"].codes, qb_float.codes)
    assert not torch.equal(qb.codes, qb_float.codes)
