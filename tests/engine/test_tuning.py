"""Build-time tuning is paid once per layer shape: a layer like one already measured gets that measurement."""

from __future__ import annotations

import torch

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import linear, w4a16


def _packed(n: int, k: int, seed: int):
    q = formats.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02, "int4_asym",
                         group_size=32)
    return linear.pack(StoredLinear("l", q, None, None, None, None), torch.bfloat16)


def test_layers_of_one_shape_are_measured_once_and_get_their_own_copy(monkeypatch):
    calls = []

    def fake_tune(fmt, group, tensors):
        calls.append((fmt, group, tensors["qweight"].shape))
        return {"1": {"path": "triton", "block_m": 1}}

    monkeypatch.setattr(linear, "_TUNED", {})
    monkeypatch.setattr(w4a16, "tune", fake_tune)
    first = linear.tune(*_packed(64, 128, 0))
    second = linear.tune(*_packed(64, 128, 1))  # other values, same shape and formats: not measured again
    assert len(calls) == 1 and first == second
    second["1"]["block_m"] = 16
    assert linear.tune(*_packed(64, 128, 2))["1"]["block_m"] == 1, "each layer gets its own copy"
    linear.tune(*_packed(96, 128, 0))  # another shape is measured
    assert [c[2] for c in calls] == [(16, 64), (16, 96)]


def test_fastest_eligible_candidate_wins_and_unfit_ones_are_passed_over(monkeypatch):
    """The tuners' shared choice: the least GPU time among the runs that fit, every timing reported."""
    import triton

    from quantlab.engine.kernels import timing

    times = {"a": 3.0, "b": 1.0, "c": None}

    def fake_time(fns):
        name = fns[0]()
        if times[name] is None:
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return times[name]

    monkeypatch.setattr(timing, "graph_time_ms", fake_time)
    seen = []
    runs = [({"cfg": n}, lambda c, n=n: n) for n in ("a", "b", "c")]
    assert timing.fastest(runs, [object(), object()], 4, seen) == {"cfg": "b"}
    assert seen == [(4, {"cfg": "a"}, 3.0), (4, {"cfg": "b"}, 1.0)]
    w = torch.ones(3)
    assert timing.agrees(lambda c: c * 1.001, w, w) and not timing.agrees(lambda c: c * 1.1, w, w)
    assert not timing.agrees(lambda c: 1 / 0, w, w), "a candidate that fails to run is not eligible"
