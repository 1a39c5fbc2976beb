"""Short text tables of a bench/kernels.py result (printed last in a run; also ``python bench/kernels_table.py F``)."""

from __future__ import annotations

import json
import sys


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def print_table(res: dict) -> None:
    s = res["sections"]
    print(f"# {res['device']} torch {res['torch']} triton {res['triton']} {res['date']}")
    if isinstance(s.get("ceilings"), dict):
        print("ceilings:", {k: round(v, 2) for k, v in s["ceilings"].items() if isinstance(v, float)})
    if isinstance(s.get("check"), list):
        bad = [r for r in s["check"] if not r.get("ok")]
        print(f"check: {len(s['check']) - len(bad)}/{len(s['check'])} ok", bad[:6])
    for sec in ("w4a16", "w8a8"):
        rows = s.get(sec)
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            print(sec, str(rows)[-1500:])
            continue
        fmts = ("int4_asym", "int4", "nvfp4", "mxfp4", "bf16_gemv") if sec == "w4a16" else ("fp8_e4m3", "int8")
        print(f"{sec}: ms (x vs bf16) [weight TB/s]")
        for r in rows:
            cells = [f"{f}={_f(r[f]['ms'])}({_f(r[f]['x_bf16'], 2)})"
                     + (f"[{_f(r[f]['weight_TBps'], 2)}]" if "weight_TBps" in r[f] else "") for f in fmts if f in r]
            extra = "".join(f" {p}={_f(r[p])}" for p in ("tinygemm_ms",
                                                         "int8_int_mm_plus_torch_epilogue_ms", "quantize_rows_ms")
                            if p in r)
            by_path = {f: {p: round(t, 4) for p, t in r[f]["product_ms_by_path"].items()} for f in fmts
                       if f in r and "product_ms_by_path" in r[f]}
            paths = f" product alone by path: {by_path}" if by_path else ""
            print(f" {r['shape']:12s} M={r['m']:5d} bf16={_f(r['bf16_ms'])} " + " ".join(cells) + extra + paths)
    rows = s.get("attention")
    if isinstance(rows, dict) and "sweep" in rows:
        best = {}
        for r in rows["sweep"]:
            key = (r["decode"], r["batch"], r["fp8"])
            if isinstance(r["ms"], float) and (key not in best or r["ms"] < best[key]["ms"]):
                best[key] = r
        print("decode sweep best:", [(k, v["block_n"], v["stages"], round(v["kv_TBps"], 2)) for k, v in best.items()])
        rows = rows["rows"]
    if isinstance(rows, list):
        print("attention: ms [KV TB/s]")
        for r in rows:
            if "context" in r:
                print(f" ctx={r['context']:6d} B={r['batch']:3d} bf16={_f(r['bf16']['ms'])}[{_f(r['bf16']['kv_TBps'], 2)}]"
                      f" fp8={_f(r['fp8']['ms'])}[{_f(r['fp8']['kv_TBps'], 2)}] sdpa={_f(r['sdpa_ms'])}")
            else:
                cfgs = {k: round(v, 3) for k, v in r.items() if "x" in k and isinstance(v, float)}
                print(f" prefill ctx={r['prefill_context']} B={r['batch']} {_f(r['ms'])}ms {_f(r['TFLOPs'], 0)}TFLOP/s"
                      f" sdpa={_f(r['sdpa_causal_ms'])} {cfgs}")
    elif rows is not None:
        print("attention", str(rows)[-1500:])
    if isinstance(s.get("gemlite"), list):
        print("gemlite:", [(r["shape"], r["m"], round(r["gemlite_ms"], 4), r.get("timed_by")) for r in s["gemlite"]])
    elif s.get("gemlite") is not None:
        print("gemlite", str(s["gemlite"])[-800:])
    if s.get("elementwise") is not None:
        print("elementwise:", json.dumps(s["elementwise"])[:1500])


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print_table(json.load(f))
