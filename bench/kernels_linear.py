"""W4A16 and W8A8 parts of bench/kernels.py: each linear of Llama-3-8B/70B beside BF16 cuBLAS and the peers.

W4A16 is tuned per shape with ``w4a16.tune`` (the build-time tuner) on INT4 g128 asym, whose choices every
format then uses; INT8 W8A8's GEMM with ``w8a8.tune_int8``. Peers: torch's tinygemm
(``_weight_int4pack_mm``) and GemLite (after its own autotuning, where its source is on the path). At M = 1
and 4 the split-K GEMV (``gemv``) is timed beside BF16 cuBLAS on the same weights (its fastest candidate),
and beside ``_scaled_mm`` / the INT8 Triton GEMM through the W8A8 tuner's timings.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import torch

from quantlab.engine.kernels import gemv, linear, w4a16, w8a8
from quantlab.engine.kernels.timing import copies_for

from kernels import MS, SHAPES, W4_FORMATS, _on, bench, gtime, stored_w4, stored_w8


def gemlite_section(deadline: float) -> list[dict]:
    """GemLite A16W4 g128 after its own autotuning (reset_config, then the first call per M tunes), at every
    M <= 64, the widest and the narrowest 8B layers first, then the other two while time remains."""
    import gemlite
    gemlite.reset_config()
    rows, layers = [], {}
    for name in ("8b.gate_up", "8b.o", "8b.qkv", "8b.down"):
        for m in (1, 4, 16, 64):
            if time.time() > deadline:
                return rows
            n, k = SHAPES[name]
            if name not in layers:
                layers = {name: [gemlite_layer(n, k) for _ in range(copies_for(n * k // 2))]}
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t0 = time.time()
            layers[name][0](x)
            torch.cuda.synchronize()
            first = time.time() - t0
            try:
                ms, how = gtime([lambda lay=lay: lay(x) for lay in layers[name]]), "cuda graph"
            except Exception:  # noqa: BLE001 - a peer that cannot be captured is timed from the host
                ms, how = bench(lambda: layers[name][0](x)), "do_bench"
            rows.append({"shape": name, "m": m, "gemlite_ms": ms, "timed_by": how, "first_call_s": first})
    return rows


def _copies(t: dict, nbytes: int) -> list[dict]:
    return [t] + [{k: v.clone() for k, v in t.items()} for _ in range(copies_for(nbytes) - 1)]


def _dense_copies(n: int, k: int) -> list[torch.Tensor]:
    """Copies of one random BF16 weight [n, k], enough to rotate through more bytes than the L2 holds."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    return [w] + [w.clone() for _ in range(copies_for(n * k * 2) - 1)]


def dense_gemv(x: torch.Tensor, dense: list[torch.Tensor], t_bf16: float) -> dict:
    """The BF16 GEMV's candidates over the same weight copies as cuBLAS: the fastest, and every time."""
    n, k = dense[0].shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    timed = [(gtime([lambda w=w, c=c: gemv.gemv(x, w, None, c) for w in dense]), c)
             for c in gemv.gemv_candidates(x.shape[0], n, k, 2, sms)]
    ms, cfg = min(timed, key=lambda tc: tc[0])
    return {"ms": ms, "x_bf16": t_bf16 / ms, "weight_TBps": n * k * 2 / ms / 1e9, "config": cfg,
            "candidates_ms": [t for t, _ in timed]}


def w4a16_section(deadline: float) -> dict:
    """Tune INT4 g128 asym per shape (as ``quantlab build`` would), use its choices for every format, time."""
    rows, tuning = [], {}
    for name, (n, k) in SHAPES.items():
        if time.time() > deadline:
            break
        dense = _dense_copies(n, k)
        packs = {}
        for fmt, group in W4_FORMATS:
            spec, t = linear.pack(stored_w4(fmt, group, n, k), torch.bfloat16)
            t = _on(t)
            if fmt == "int4_asym":
                timings = []
                tuning[name] = {"choice": w4a16.tune(fmt, group, t, timings=timings), "timings": timings}
            spec = dataclasses.replace(spec, kernel_config=tuning[name]["choice"])
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            packs[fmt] = (spec, _copies(t, nbytes), nbytes)
        tiny = tinygemm_weight(n, k)
        for m in MS:
            if time.time() > deadline:
                break
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = gtime([lambda w=w: x @ w.t() for w in dense])
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_ms": t_bf16}
            if m in (1, 4):
                row["bf16_gemv"] = dense_gemv(x, dense, t_bf16)
            for fmt, (spec, copies, nbytes) in packs.items():
                if fmt != "int4_asym" and m not in (1, 16, 64, 4096):  # device time: the other formats at 4 M
                    continue
                ms = gtime([lambda c=c: linear.apply(x, spec, c) for c in copies])
                row[fmt] = {"ms": ms, "x_bf16": t_bf16 / ms, "weight_TBps": nbytes / ms / 1e9,
                            "config": w4a16.config_for(spec.kernel_config, m, n, k).__dict__}
            if tiny and m <= 256:  # tinygemm is ~0.04x BF16 at M = 4096 (issue 16): not worth the device time
                row["tinygemm_ms"] = gtime([lambda w=w, z=z: torch.ops.aten._weight_int4pack_mm(x, w, 128, z)
                                            for w, z in tiny])
            rows.append(row)
        del dense, packs, tiny
        torch.cuda.empty_cache()
    return {"rows": rows, "tuning": tuning}


def tinygemm_weight(n, k) -> list:
    """torch's tinygemm int4 (g128) weights for timing (copies to exceed L2): random codes, torch's packer."""
    try:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        return [(w, sz)] + [(w.clone(), sz.clone()) for _ in range(copies_for(n * k // 2) - 1)]
    except Exception:  # noqa: BLE001 - a peer that does not run here is recorded as absent
        traceback.print_exc()
        return []


def gemlite_layer(n, k):
    """GemLite's A16W4 (g128, asymmetric, HQQ layout) layer for the same shape, random codes."""
    import gemlite
    from gemlite import DType, GemLiteLinear
    layer = GemLiteLinear(4, group_size=128, in_features=k, out_features=n, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)
    wq = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    scales = torch.rand(n, k // 128, device="cuda", dtype=torch.bfloat16) * 0.01
    zeros = torch.full((n, k // 128), 8.0, device="cuda", dtype=torch.bfloat16)
    layer.pack(wq, scales, zeros, None)
    del gemlite
    return layer


def w8a8_section(deadline: float) -> dict:
    """FP8 and INT8 W8A8 as the engine runs them after ``quantlab build``'s tuning (INT8: Triton GEMM configs;
    FP8: row-wise ``_scaled_mm`` or the Triton GEMM, per M bucket; at M <= 4 also the GEMV), activation
    quantization included. At M <= 4 a row also has the product alone (no quantization), fastest per path,
    from the tuner's timings."""
    rows, tuning = [], {}
    for name, (n, k) in SHAPES.items():
        if time.time() > deadline:
            break
        dense = _dense_copies(n, k)
        packs = {}
        for fmt in ("fp8_e4m3", "int8"):
            spec, t = linear.pack(stored_w8(fmt, n, k), torch.bfloat16)
            t = _on(t)
            timings = []
            tune = w8a8.tune_int8 if fmt == "int8" else w8a8.tune_fp8
            choice = tune(t, ms=(1, 4, 1024, 4096), timings=timings)
            tuning[f"{name} {fmt}"] = {"choice": choice, "timings": timings}
            spec = dataclasses.replace(spec, kernel_config=choice)
            packs[fmt] = (spec, _copies(t, n * k))
        for m in (1, 4, 1024, 4096):
            if time.time() > deadline:
                break
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = gtime([lambda w=w: x @ w.t() for w in dense])
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_ms": t_bf16,
                   "quantize_rows_ms": gtime([lambda: w8a8.quantize_rows(x, "fp8_e4m3")])}
            for fmt, (spec, copies) in packs.items():
                ms = gtime([lambda c=c: linear.apply(x, spec, c) for c in copies])
                row[fmt] = {"ms": ms, "x_bf16": t_bf16 / ms}
                if m <= gemv.MAX_M:
                    best = {}
                    for tm, cfg, t_ms in tuning[f"{name} {fmt}"]["timings"]:
                        path = cfg.get("path", "triton")
                        if tm == m and t_ms < best.get(path, float("inf")):
                            best[path] = t_ms
                    row[fmt]["product_ms_by_path"] = best
            if m > 16:
                qi, si = w8a8.quantize_rows(x, "int8")
                ti = packs["int8"][1]
                row["int8_int_mm_plus_torch_epilogue_ms"] = gtime(
                    [lambda c=c: (torch._int_mm(qi, c["weight"].t()).float() * si * c["weight_scale"]).to(torch.bfloat16)
                     for c in ti])
            rows.append(row)
        del dense, packs
        torch.cuda.empty_cache()
    return {"rows": rows, "tuning": tuning}
