"""Kernel correctness and speed on the GPU: every engine kernel beside BF16 cuBLAS, the measured ceilings, peers.

One run does, in order (each section time-boxed, errors recorded, never fatal):
1. ceilings: device-to-device copy bandwidth, BF16 matmul, FP8 row-wise ``_scaled_mm`` and INT8 ``_int_mm`` rates;
2. correctness: each Triton path against its reference on fresh random inputs in poisoned memory (bf16);
3. W4A16 (INT4 g128 asym/sym, NVFP4, MXFP4) on the Llama-3-8B/70B linears for M = 1 .. 4096, beside BF16
   cuBLAS and torch's tinygemm (``_weight_int4pack_mm``), after ``w4a16.tune`` (the build-time tuner) on
   INT4 g128 asym for each shape, whose choices every format then uses (same kernel, other decode);
   at M = 1 and 4 the split-K BF16 GEMV (``gemv``, its fastest candidate) is timed beside BF16 cuBLAS;
4. W8A8 FP8/INT8 (activation quantization included; INT8 GEMM tuned per shape; at M <= 4 the GEMV among the
   tuner's candidates, its time beside ``_scaled_mm``'s and the Triton GEMM's), attention
   (bench/kernels_attention.py: a config sweep, then the defaults), elementwise;
5. gemlite: GemLite A16W4 after its own autotuning, where its source is on the path.

    python bench/kernels.py --out bench/results/kernels_h200.json [--sections ceilings,check,w4a16,...]

Kernel times are GPU time from CUDA-graph replays over enough copies of the inputs to exceed L2
(``engine/kernels/timing.py``); the ceilings are ``triton.testing.do_bench`` medians of single large ops.
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
from quantlab.engine.kernels import gemv, linear, w4a16, w8a8
from quantlab.engine.kernels.timing import graph_time_ms
from quantlab.recipe.schema import ActivationScheme

SHAPES = {"8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336), "70b.down": (8192, 28672),
          "8b.qkv": (6144, 4096), "70b.gate_up": (57344, 8192)}  # (N = out, K = in), in the order they are run
MS = (1, 4, 16, 64, 256, 1024, 4096)
W4_FORMATS = (("int4_asym", 128), ("int4", 128), ("nvfp4", 16), ("mxfp4", 32))


def bench(fn, rep=20) -> float:
    """Median milliseconds from the host (L2 flushed between calls): for large single operations."""
    return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")


def gtime(fns) -> float:
    """GPU milliseconds per call from CUDA-graph replays, round-robin over copies of the inputs."""
    return graph_time_ms(fns)


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
        for m in ((1, 5, 33, 300, 1500) if group in (128, 16) or fmt == "mxfp4" else (1, 33)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = linear.linear_ref(x.float(), spec, {kk: v.float() if kk == "bias" else v for kk, v in t.items()})
            poison()
            err = rel_err(linear.apply(x, spec, t), want)
            rows.append({"kernel": f"w4a16 {fmt} g{group}", "m": m, "rel_err": err, "ok": err < 1e-2})
            if m == 1:  # the GEMV form (only tuning picks it), with and without split-K
                for split in (1, 3):
                    poison()
                    cfg = w4a16.Config("triton", 1, 64, 256, split, 4, 3)
                    err = rel_err(w4a16.w4a16_matmul(x, fmt, spec.group_size or k, t, cfg), want)
                    rows.append({"kernel": f"w4a16 gemv {fmt} g{group} split{split}", "m": 1, "rel_err": err,
                                 "ok": err < 1e-2})
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
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wi = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    sw = torch.rand(1, n, device="cuda") * 1e-2
    for m in (1, 3):  # the split-K GEMV (only tuning picks it), its default candidate: split over K, masked K tail
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        poison()
        err = rel_err(gemv.gemv(x, w, b), torch.nn.functional.linear(x.float(), w.float(), b.float()))
        rows.append({"kernel": "gemv bf16", "m": m, "rel_err": err, "ok": err < 1e-2})
        q, sa = w8a8.quantize_rows(x, "int8")
        poison()
        same = torch.equal(gemv.gemv_w8(q, sa, wi, sw, b, torch.bfloat16),
                           w8a8.w8a8_gemm(q, sa, wi, sw, b, torch.bfloat16))
        rows.append({"kernel": "gemv int8 bit-identical to w8a8_gemm", "m": m, "ok": bool(same)})
    return rows


def elementwise_section() -> list[dict]:
    from quantlab.engine.kernels import activation, norm, rope_kv
    rows = []
    for t in (1, 64, 4096):
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(t, 2 * 14336, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(t, (32 + 2 * 8) * 128, device="cuda", dtype=torch.bfloat16)  # Llama-3-8B's q/k/v heads
        pos = torch.randint(0, 8192, (t,), device="cuda")
        cs = torch.randn(8192, 128, device="cuda")
        slots = torch.randperm(t + 16, device="cuda")[:t]
        caches = [torch.zeros(t // 16 + 1, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]

        def rope_write(fn, k_cache, v_cache):
            return fn(qkv, 32, 8, pos, cs, k_cache, v_cache, slots)
        err = [rel_err(norm.rms_norm(x, w, 1e-5, r)[0], norm.rms_norm_ref(x, w, 1e-5, r)[0]),
               rel_err(activation.silu_and_mul(g), activation.silu_and_mul_ref(g)),
               rel_err(rope_write(rope_kv.rope_write_kv, *caches[:2]), rope_write(rope_kv.rope_write_kv_ref, *caches[2:]))]
        err.append(all(torch.equal(a, b) for a, b in zip(caches[:2], caches[2:])))
        rows.append({"tokens": t, "rel_err(norm,silu,rope_kv q), rope_kv cache bit-exact": err,
                     "rms_norm_residual": [gtime([lambda: norm.rms_norm(x, w, 1e-5, r)]),
                                           gtime([lambda: norm.rms_norm_ref(x, w, 1e-5, r)])],
                     "silu_and_mul": [gtime([lambda: activation.silu_and_mul(g)]),
                                      gtime([lambda: activation.silu_and_mul_ref(g)])],
                     "rope_write_kv": [gtime([lambda: rope_write(rope_kv.rope_write_kv, *caches[:2])]),
                                       gtime([lambda: rope_write(rope_kv.rope_write_kv_ref, *caches[2:])])],
                     "note": "[triton_ms, torch_eager_ref_ms], CUDA-graph GPU time"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="ceilings,check,w4a16,w8a8,attention,elementwise,gemlite")
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    start = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "sections": {}}
    plan = args.sections.split(",")
    share = {"ceilings": 0.05, "check": 0.12, "w4a16": 0.3, "w8a8": 0.08, "attention": 0.1,
             "elementwise": 0.03, "gemlite": 0.32}
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
            elif sec in ("w4a16", "w8a8", "gemlite"):
                import kernels_linear
                out = getattr(kernels_linear, f"{sec}_section")(deadline)
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
