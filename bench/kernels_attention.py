"""Attention part of bench/kernels.py: paged decode/prefill (BF16 and FP8 KV) against the reference and SDPA.

Llama-3-8B attention (32 q heads, 8 KV heads, head_dim 128), 16-token pages scattered at random over the
pool. Decode reads B x context x 8 x 128 x 2 (K and V) elements of the cache: that byte count over the time
is the bandwidth compared with the copy ceiling. SDPA (``enable_gqa``) runs on contiguous caches. Times are
CUDA-graph GPU times over enough copies of the caches to exceed L2 (bench/kernels.py ``gtime``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from quantlab.engine.kernels import attention, rope_kv
from quantlab.engine.kernels.attention_decode import paged_decode
from quantlab.engine.kernels.attention_prefill import paged_prefill
from quantlab.engine.kernels.timing import copies_for
from quantlab.formats.fp8 import cast_saturating

HQ, HKV, D, PAGE = 32, 8, 128, 16


def _paged(b, ctx, fp8):
    nb = b * ctx // PAGE
    k = torch.randn(nb, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(nb, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nb, device="cuda", dtype=torch.int32).reshape(b, ctx // PAGE)
    ks = vs = None
    if fp8:
        ks = torch.full((HKV,), 0.01, device="cuda")
        vs = torch.full((HKV,), 0.01, device="cuda")
        k = cast_saturating(k / 0.01, torch.float8_e4m3fn)  # bf16 in, no float32 copy of a 4 GB cache
        v = cast_saturating(v / 0.01, torch.float8_e4m3fn)
    return k, v, tables, ks, vs


def check_attention() -> list[dict]:
    from kernels import poison, rel_err
    rows = []
    for fp8 in (False, True):
        for b, ctx, qlens in ((3, 2048, None), (4, 512, (1, 100, 477, 37))):  # 477: a whole prefill
            k, v, tables, ks, vs = _paged(b, ctx, fp8)
            lens = torch.tensor([ctx - 16 * i - 3 for i in range(b)], device="cuda", dtype=torch.int32)
            ql = [1] * b if qlens is None else list(qlens)
            qsl = torch.tensor([0] + torch.tensor(ql).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
            q = torch.randn(int(qsl[-1]), HQ, D, device="cuda", dtype=torch.bfloat16)
            want = attention.paged_attention_ref(q, k, v, tables, lens, qsl, D ** -0.5, ks, vs)
            poison()
            got = attention.paged_attention(q, k, v, tables, lens, qsl, D ** -0.5, ks, vs)
            err = rel_err(got, want)
            rows.append({"kernel": f"attention {'decode' if qlens is None else 'prefill'} fp8={fp8}",
                         "rel_err": err, "ok": err < 2e-2})
        kc = torch.zeros(64, PAGE, HKV, D, device="cuda", dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
        caches = [kc.clone() for _ in range(4)]
        qkv = torch.randn(100, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 4096, (100,), device="cuda")
        cs = torch.randn(4096, D, device="cuda")
        slots = torch.randperm(64 * PAGE, device="cuda")[:100]
        sc = torch.rand(HKV, device="cuda") * 0.01 + 0.001 if fp8 else None
        rope_kv.rope_write_kv_ref(qkv, HQ, HKV, pos, cs, caches[0], caches[1], slots, sc, sc)
        rope_kv.rope_write_kv(qkv, HQ, HKV, pos, cs, caches[2], caches[3], slots, sc, sc)
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in ((caches[0], caches[2]),
                                                                                      (caches[1], caches[3])))
        rows.append({"kernel": f"rope_write_kv cache fp8={fp8} bit-exact", "ok": same})
    return rows


def _decode_case(b, ctx, fp8):
    """Copies of a decode problem (enough to exceed L2) and a call factory over them."""
    k, v, tables, ks, vs = _paged(b, ctx, fp8)
    kv = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies_for(2 * k.numel() * k.element_size()) - 1)]
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)

    def calls(**cfg):
        return [lambda kk=kk, vv=vv: paged_decode(q, kk, vv, tables, lens, D ** -0.5, ks, vs, **cfg) for kk, vv in kv]
    return calls, b * ctx * HKV * D * 2 * (1 if fp8 else 2)


def attention_section(deadline: float) -> dict:
    from kernels import gtime
    sweep = []
    for ctx, b in ((32768, 16),):
        for fp8 in (False, True):
            calls, nbytes = _decode_case(b, ctx, fp8)
            for block_n in ((64, 128, 256) if fp8 else (64, 128)):
                for stages in (3,):
                    try:
                        ms = gtime(calls(block_n=block_n, num_stages=stages))
                    except Exception as e:  # noqa: BLE001 - a config that does not fit is recorded
                        ms = repr(e)[:100]
                    sweep.append({"decode": ctx, "batch": b, "fp8": fp8, "block_n": block_n, "stages": stages, "ms": ms,
                                  "kv_TBps": nbytes / ms / 1e9 if isinstance(ms, float) else None})
            del calls
            torch.cuda.empty_cache()
    rows = []
    for ctx in (512, 4096, 32768):
        for b in (1, 16, 64):
            if time.time() > deadline:
                return {"rows": rows, "sweep": sweep}
            row = {"context": ctx, "batch": b}
            for fp8 in (False, True):
                calls, nbytes = _decode_case(b, ctx, fp8)
                ms = gtime(calls())
                row["fp8" if fp8 else "bf16"] = {"ms": ms, "kv_TBps": nbytes / ms / 1e9}
                del calls
            kd = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            kvd = [(kd, kd.clone())] + [(kd.clone(), kd.clone()) for _ in range(copies_for(2 * kd.numel() * 2) - 1)]
            qd = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            row["sdpa_ms"] = gtime([lambda k=k, v=v: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)
                                    for k, v in kvd])
            del kd, kvd
            torch.cuda.empty_cache()
            rows.append(row)
    for ctx, b in ((512, 16), (4096, 1), (4096, 8)):  # full prefill: T = b * ctx queries, causal
        if time.time() > deadline:
            break
        k, v, tables, _, _ = _paged(b, ctx, False)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        qsl = torch.arange(0, b * ctx + 1, ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b * ctx, HQ, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * ctx * ctx / 2 * HQ * D
        row = {"prefill_context": ctx, "batch": b}
        for bm, bn, w, st in (((128, 128, 8, 2), (64, 64, 4, 2)) if (ctx, b) == (4096, 8) else ()):
            try:
                ms = gtime([lambda: paged_prefill(q, k, v, tables, lens, qsl, D ** -0.5, block_m=bm, block_n=bn,
                                                  num_warps=w, num_stages=st)])
            except Exception as e:  # noqa: BLE001
                ms = repr(e)[:100]
            row[f"{bm}x{bn}w{w}s{st}"] = ms
        row["ms"] = gtime([lambda: attention.paged_attention(q, k, v, tables, lens, qsl, D ** -0.5)])
        row["TFLOPs"] = flops / row["ms"] / 1e9
        qd = torch.randn(b, HQ, ctx, D, device="cuda", dtype=torch.bfloat16)
        kd = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
        row["sdpa_causal_ms"] = gtime([lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True)])
        rows.append(row)
    return {"rows": rows, "sweep": sweep}
