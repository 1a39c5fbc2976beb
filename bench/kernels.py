"""Kernel correctness and speed on the GPU: every engine kernel beside BF16 cuBLAS, the measured ceilings, peers.

One run does, in order (each section time-boxed, errors recorded, never fatal):
1. ceilings: device-to-device copy bandwidth, BF16 matmul, FP8 row-wise ``_scaled_mm`` and INT8 ``_int_mm`` rates;
2. correctness: each Triton path against its reference on fresh random inputs in poisoned memory (bf16);
3. W4A16 (INT4 g128 asym/sym, NVFP4, MXFP4) on the Llama-3-8B/70B linears for M = 1 .. 4096, beside BF16
   cuBLAS and torch's tinygemm (``_weight_int4pack_mm``);
4. W8A8 FP8/INT8 (activation quantization included), attention (bench/kernels_attention.py), elementwise;
5. sweep: every config ``w4a16.tune`` considers, on three shapes; gemlite: GemLite A16W4 after its own
   autotuning, where its source is on the path.

    python bench/kernels.py --out bench/results/kernels_h200.json [--sections ceilings,check,w4a16,...]

Times are ``triton.testing.do_bench`` medians (L2 flushed between repetitions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import traceback

import torch
import triton

from quantlab import formats
from quantlab.checkpoint.stream import StoredLinear
from quantlab.engine.kernels import linear, w4a16, w8a8
from quantlab.recipe.schema import ActivationScheme

SHAPES = {"8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
          "70b.gate_up": (57344, 8192), "70b.down": (8192, 28672)}  # (N = out, K = in)
MS = (1, 4, 16, 64, 256, 1024, 4096)
W4_FORMATS = (("int4_asym", 128), ("int4", 128), ("nvfp4", 16), ("mxfp4", 32))


def bench(fn, rep=20) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")


def poison():
    """Fill a large freed block with NaN so the next allocations (kernel outputs) start as NaN."""
    torch.empty(1 << 28, dtype=torch.uint8, device="cuda").fill_(0xFF)


def rel_err(got, want) -> float:
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def ceilings() -> dict:
    out = {}
    a = torch.randn(1 << 29, device="cuda")  # 2 GiB
    b = torch.empty_like(a)
    out["copy_TBps"] = 2 * a.numel() * 4 / bench(lambda: b.copy_(a)) / 1e9
    del a, b
    n = 8192
    x, y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out["bf16_mm_TFLOPs"] = 2 * n**3 / bench(lambda: x @ y) / 1e9
    xf, yf = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t().contiguous().t()
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    out["fp8_scaled_mm_rowwise_TFLOPs"] = 2 * n**3 / bench(
        lambda: torch._scaled_mm(xf, yf, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)) / 1e9
    xi = torch.randint(-128, 127, (n, n), device="cuda", dtype=torch.int8)
    yi = torch.randint(-128, 127, (n, n), device="cuda", dtype=torch.int8).t().contiguous().t()
    out["int8_int_mm_TOPs"] = 2 * n**3 / bench(lambda: torch._int_mm(xi, yi)) / 1e9
    w = torch.randn(4096, 28672, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 28672, device="cuda", dtype=torch.bfloat16)
    out["bf16_gemv_TBps(28672->4096)"] = w.numel() * 2 / bench(lambda: v @ w.t()) / 1e9
    return out


def stored_w4(fmt, group, n, k, bias=False):
    w = torch.randn(n, k, device="cuda") * 0.02
    q = formats.quantize(w, fmt, group_size=None if formats.get_spec(fmt).family == "fp4" else group)
    return StoredLinear("l", q, None, None, None, torch.randn(n, device="cuda") if bias else None)


def stored_w8(fmt, n, k, granularity="token", bias=False):
    q = formats.quantize(torch.randn(n, k, device="cuda") * 0.02, fmt)
    act = ActivationScheme(fmt, granularity, dynamic=granularity == "token")
    scale = torch.tensor([0.05], device="cuda") if granularity == "tensor" else None
    return StoredLinear("l", q, act, scale, None, torch.randn(n, device="cuda") if bias else None)


def _on(tensors):
    return {k: v.cuda() for k, v in tensors.items()}


def check_linear() -> list[dict]:
    rows = []
    n, k = 1008, 4096 + 128  # N not a multiple of 64 (16 for _scaled_mm); K ends on a group edge
    for fmt, group in W4_FORMATS + (("int4_asym", 32), ("int4", 64)):
        st = stored_w4(fmt, group, n, k, bias=True)
        spec, t = linear.pack(st, torch.bfloat16)
        t = _on(t)
        for m in (1, 5, 16, 33, 300, 1500):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = linear.linear_ref(x.float(), spec, {kk: v.float() if kk == "bias" else v for kk, v in t.items()})
            poison()
            err = rel_err(linear.apply(x, spec, t), want)
            rows.append({"kernel": f"w4a16 {fmt} g{group}", "m": m, "rel_err": err, "ok": err < 1e-2})
    for fmt in ("fp8_e4m3", "int8"):
        for gran in ("token", "tensor"):
            spec, t = linear.pack(stored_w8(fmt, n, k, gran, bias=True), torch.bfloat16)
            t = _on(t)
            for m in (1, 17, 300):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = linear.linear_ref(x, spec, t)
                poison()
                err = rel_err(linear.apply(x, spec, t), want)
                rows.append({"kernel": f"w8a8 {fmt} {gran}", "m": m, "rel_err": err, "ok": err < 1e-2})
        q, s = w8a8.quantize_rows(x := torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 5, fmt)
        ref = formats.quantize(x.float(), fmt)
        rows.append({"kernel": f"quantize_rows {fmt} bit-exact", "m": 64,
                     "ok": bool(torch.equal(q.float(), ref.codes.float()) and torch.equal(s, ref.scale.float()))})
    return rows


def sweep_section(deadline: float) -> list[dict]:
    """Every candidate config ``w4a16.tune`` considers, timed on three shapes (INT4 g128 asym, NVFP4 once)."""
    rows = []
    for name, fmt, group in (("8b.o", "int4_asym", 128), ("8b.gate_up", "int4_asym", 128),
                             ("70b.down", "int4_asym", 128), ("8b.gate_up", "nvfp4", 16)):
        if time.time() > deadline:
            break
        n, k = SHAPES[name]
        _, t = linear.pack(stored_w4(fmt, group, n, k), torch.bfloat16)
        timings = []
        choice = w4a16.tune(fmt, group, _on(t), ms=(1, 16, 64, 256, 1024, 4096), timings=timings)
        rows.append({"shape": name, "fmt": fmt, "choice": choice, "timings": timings})
    return rows


def gemlite_section(deadline: float) -> list[dict]:
    """GemLite A16W4 g128 after its own autotuning (reset_config, then the first call per M tunes)."""
    import gemlite
    gemlite.reset_config()
    rows = []
    for name in ("8b.o", "8b.qkv", "8b.gate_up", "8b.down"):
        n, k = SHAPES[name]
        layer = gemlite_layer(n, k)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 4, 16, 64, 256, 4096):
            if time.time() > deadline:
                return rows
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t0 = time.time()
            layer(x)
            torch.cuda.synchronize()
            rows.append({"shape": name, "m": m, "gemlite_ms": bench(lambda: layer(x)),
                         "bf16_ms": bench(lambda: x @ dense.t()), "first_call_s": time.time() - t0})
    return rows


def w4a16_section(deadline: float) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        tiny = tinygemm_weight(n, k)
        packs = {}
        for fmt, group in W4_FORMATS:
            spec, t = linear.pack(stored_w4(fmt, group, n, k), torch.bfloat16)
            packs[fmt] = (spec, _on(t))
        for m in MS:
            if time.time() > deadline:
                return rows
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(lambda: x @ dense.t())
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_ms": t_bf16}
            for fmt, (spec, t) in packs.items():
                wbytes = sum(v.numel() * v.element_size() for v in t.values())
                ms = bench(lambda: linear.apply(x, spec, t))
                cfg = w4a16.config_for(spec.kernel_config, m, n, k)
                row[fmt] = {"ms": ms, "x_bf16": t_bf16 / ms, "weight_TBps": wbytes / ms / 1e9,
                            "config": cfg.__dict__}
            if tiny is not None:
                w_t, sz = tiny
                row["tinygemm_ms"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w_t, 128, sz))
            rows.append(row)
        del dense, packs, tiny
        torch.cuda.empty_cache()
    return rows


def tinygemm_weight(n, k):
    """torch's tinygemm int4 (g128) weight for timing: random codes, packed by torch's own converter."""
    try:
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        return w, sz
    except Exception:  # noqa: BLE001 - a peer that does not run here is recorded as absent
        traceback.print_exc()
        return None


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


def w8a8_section(deadline: float) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packs = {fmt: (lambda s_t: (s_t[0], _on(s_t[1])))(linear.pack(stored_w8(fmt, n, k), torch.bfloat16))
                 for fmt in ("fp8_e4m3", "int8")}
        for m in (1, 16, 256, 1024, 4096):
            if time.time() > deadline:
                return rows
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(lambda: x @ dense.t())
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_ms": t_bf16,
                   "quantize_rows_ms": bench(lambda: w8a8.quantize_rows(x, "fp8_e4m3"))}
            for fmt, (spec, t) in packs.items():
                ms = bench(lambda: linear.apply(x, spec, t))
                row[fmt] = {"ms": ms, "x_bf16": t_bf16 / ms}
            _, ti = packs["int8"]
            if m > 16:
                qi, si = w8a8.quantize_rows(x, "int8")
                wt = ti["weight"].t()
                row["int8_int_mm_plus_torch_epilogue_ms"] = bench(
                    lambda: (torch._int_mm(qi, wt).float() * si * ti["weight_scale"]).to(torch.bfloat16))
            rows.append(row)
        del dense, packs
        torch.cuda.empty_cache()
    return rows


def elementwise_section() -> list[dict]:
    from quantlab.engine.kernels import activation, norm, rope
    rows = []
    for t in (1, 64, 4096):
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(t, 2 * 14336, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 8192, (t,), device="cuda")
        cs = torch.randn(8192, 128, device="cuda")
        err = [rel_err(norm.rms_norm(x, w, 1e-5, r)[0], norm.rms_norm_ref(x, w, 1e-5, r)[0]),
               rel_err(activation.silu_and_mul(g), activation.silu_and_mul_ref(g)),
               rel_err(rope.apply_rope(q, pos, cs), rope.apply_rope_ref(q, pos, cs))]
        rows.append({"tokens": t, "rel_err(norm,silu,rope)": err,
                     "rms_norm_residual": [bench(lambda: norm.rms_norm(x, w, 1e-5, r)),
                                           bench(lambda: norm.rms_norm_ref(x, w, 1e-5, r))],
                     "silu_and_mul": [bench(lambda: activation.silu_and_mul(g)),
                                      bench(lambda: activation.silu_and_mul_ref(g))],
                     "rope": [bench(lambda: rope.apply_rope(q, pos, cs)), bench(lambda: rope.apply_rope_ref(q, pos, cs))],
                     "note": "[triton_ms, torch_eager_ref_ms]"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="ceilings,check,w4a16,w8a8,attention,elementwise,sweep,gemlite")
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    start = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "sections": {}}
    plan = args.sections.split(",")
    share = {"ceilings": 0.04, "check": 0.1, "w4a16": 0.3, "sweep": 0.15, "w8a8": 0.12, "attention": 0.15,
             "elementwise": 0.04, "gemlite": 0.1}
    for i, sec in enumerate(plan):
        deadline = time.time() + share[sec] * args.budget_s
        t0 = time.time()
        try:
            if sec == "ceilings":
                out = ceilings()
            elif sec == "check":
                out = check_linear()
                from kernels_attention import check_attention
                out += check_attention()
            elif sec == "w4a16":
                out = w4a16_section(deadline)
            elif sec == "sweep":
                out = sweep_section(deadline)
            elif sec == "gemlite":
                out = gemlite_section(deadline)
            elif sec == "w8a8":
                out = w8a8_section(deadline)
            elif sec == "attention":
                from kernels_attention import attention_section
                out = attention_section(deadline)
            else:
                out = elementwise_section()
        except Exception:  # noqa: BLE001 - a failing section is recorded and the run goes on
            out = {"error": traceback.format_exc()}
        res["sections"][sec] = out
        res["sections"][sec + "_seconds"] = time.time() - t0
        print(f"[{sec}] {time.time() - t0:.1f}s", flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    res["seconds"] = time.time() - start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    from kernels_table import print_table
    print_table(res)


if __name__ == "__main__":
    main()
