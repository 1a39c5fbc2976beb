"""quantlab vs llm-compressor on the default model, side by side, on identical samples.

For each scheme: quantize SmolLM2-135M with quantlab (a recipe from recipes/, sometimes with settings
matched to the peer's) and with llm-compressor (bench/peers/llmcompressor_run.py in its own venv, see
bench/peers/setup_peer_venv.sh), each in a fresh process, on the SAME calibration token windows
(quantlab.data's windows of calib_data/gpl-3.txt). Report perplexity on the first 1,024 tokens of the
held-out calib_data/heldout/apache-2.0.txt (the protocol of shared/PEERS.md), the float baseline,
calibration wall time (the calibration call only, not loading or saving) and peak resident memory.

    .venv/bin/python bench/accuracy_vs_peers.py                 # everything (an hour or more on 2 cores)
    .venv/bin/python bench/accuracy_vs_peers.py --schemes fp8-dynamic,w4a16-gptq --no-peer
    .venv/bin/python bench/accuracy_vs_peers.py --table         # print the markdown table of the results file
    .venv/bin/python bench/accuracy_vs_peers.py --rescore-peer --no-peer --no-quantlab   # wide ppl of saved peer checkpoints

Results accumulate in bench/results/accuracy_vs_peers.json (one entry per scheme and tool; an entry
already there is not run again unless --rerun), so an interrupted run resumes. Two runs may share the file
(say ``--no-peer`` and ``--no-quantlab`` side by side, each with OMP_NUM_THREADS=1): entries are merged
under a lock. Each entry records its date and thread count.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "accuracy_vs_peers.json"
PEER_PY = ROOT / ".peer-venv" / "bin" / "python"
PEER_RUN = ROOT / "bench" / "peers" / "llmcompressor_run.py"
MODELOPT_PY = ROOT / ".modelopt-venv" / "bin" / "python"
MODELOPT_RUN = ROOT / "bench" / "peers" / "modelopt_run.py"
# bench scheme -> NVIDIA Model Optimizer scheme (bench/peers/modelopt_run.py), run with --modelopt.
MODELOPT = {"fp8-dynamic": "FP8_PER_CHANNEL_PER_TOKEN", "w4a16-awq-sym": "INT4_AWQ_G64", "nvfp4a16": "W4A16_NVFP4",
            "nvfp4-w4a4": "NVFP4"}
EVAL_TEXT = "calib_data/heldout/apache-2.0.txt"
EVAL_TOKENS = 1024
# The wide evaluation: every held-out text in this order, one token stream cut into 1,024-token windows,
# the first WIDE_WINDOWS of them (the three licenses, then CPython docstrings n-z). A 1,024-token
# perplexity moves by a percent or two between two equally good roundings; ~29k tokens settle that.
WIDE_TEXTS = ("calib_data/heldout/apache-2.0.txt", "calib_data/heldout/lgpl-2.1.txt", "calib_data/heldout/mpl-2.0.txt",
              "calib_data/heldout/stdlib_docstrings.jsonl")
WIDE_WINDOWS = 28


def _int4(fmt: str, observer: str) -> dict:
    return {"format": fmt, "granularity": "group", "group_size": 64, "observer": observer}


# name -> (base recipe, edits to its quantization/stages, llm-compressor scheme or None). The "-one-pass" GPTQ
# rows take every Hessian of a layer from one float pass, as llm-compressor does: its settings matched.
SCHEMES = {
    "fp8-dynamic": ("fp8-dynamic", {}, "FP8_DYNAMIC"),
    "w8a8-smoothquant-gptq": ("w8a8-smoothquant", {}, "W8A8_SQ"),
    "w4a16-rtn-sym-minmax": ("w4a16-rtn", {"weights": _int4("int4", "minmax")}, "W4A16_RTN_G64_SYM"),
    "w4a16-rtn-asym-minmax": ("w4a16-rtn", {"weights": _int4("int4_asym", "minmax")}, "W4A16_RTN_G64_ASYM"),
    "w4a16-rtn-asym-mse": ("w4a16-rtn", {"weights": _int4("int4_asym", "mse")}, None),
    "w4a16-gptq-sym": ("w4a16-gptq", {"weights": _int4("int4", "minmax"), "stages": [{"gptq": {"act_order": False}}]}, "W4A16_GPTQ_G64_SYM"),
    "w4a16-gptq-asym": ("w4a16-gptq", {"weights": _int4("int4_asym", "minmax"), "stages": [{"gptq": {"act_order": False}}]}, "W4A16_GPTQ_G64_ASYM"),
    "w4a16-gptq-asym-actorder": ("w4a16-gptq", {"weights": _int4("int4_asym", "minmax"), "stages": [{"gptq": {"act_order": True}}]}, "W4A16_GPTQ_G64_ASYM_ACTORDER"),
    "w4a16-gptq-asym-actorder-mse": ("w4a16-gptq", {"weights": _int4("int4_asym", "mse")}, None),
    "w4a16-gptq-asym-one-pass": ("w4a16-gptq", {"weights": _int4("int4_asym", "minmax"),
                                                 "stages": [{"gptq": {"act_order": False, "true_sequential": False}}]}, "W4A16_GPTQ_G64_ASYM"),
    "w4a16-gptq-asym-actorder-one-pass": ("w4a16-gptq", {"weights": _int4("int4_asym", "minmax"),
                                                          "stages": [{"gptq": {"act_order": True, "true_sequential": False}}]}, "W4A16_GPTQ_G64_ASYM_ACTORDER"),
    "w4a16-awq-asym": ("w4a16-awq", {}, "W4A16_AWQ_G64_ASYM"),
    "w4a16-awq-sym": ("w4a16-awq", {"weights": _int4("int4", "minmax")}, None),
    # ModelOpt's awq_lite (the INT4_AWQ_G64 row) searches scales only, no clipping.
    "w4a16-awq-sym-noclip": ("w4a16-awq", {"weights": _int4("int4", "minmax"),
                                           "stages": [{"awq": {"clip_search": False}}, {"rtn": {}}]}, None),
    "w4a16-awq-asym-noclip": ("w4a16-awq", {"stages": [{"awq": {"clip_search": False}}, {"rtn": {}}]}, None),
    "nvfp4a16": ("nvfp4a16", {}, "NVFP4A16"),
    "nvfp4-w4a4": ("nvfp4", {}, "NVFP4"),
    "mxfp4a16": ("mxfp4", {}, "MXFP4A16"),
    "nvfp4a16-mse": ("nvfp4a16", {"weights": {"format": "nvfp4", "granularity": "group", "group_size": 16, "observer": "mse"}}, None),
    "mxfp4a16-mse": ("mxfp4", {"weights": {"format": "mxfp4", "granularity": "group", "group_size": 32, "observer": "mse"}}, None),
    "fp8-dynamic+kv": ("fp8-dynamic", {"kv": True}, "FP8_DYNAMIC"),
    "w8a8-smoothquant-gptq+kv": ("w8a8-smoothquant", {"kv": True}, "W8A8_SQ"),
    "w4a16-gptq-asym+kv": ("w4a16-gptq", {"weights": _int4("int4_asym", "minmax"), "stages": [{"gptq": {"act_order": False}}], "kv": True}, "W4A16_GPTQ_G64_ASYM"),
    "nvfp4-w4a4+kv": ("nvfp4", {"kv": True}, "NVFP4"),
    "w4a16-rtn-asym-minmax+kv": ("w4a16-rtn", {"weights": _int4("int4_asym", "minmax"), "kv": True}, "W4A16_RTN_G64_ASYM"),
    "nvfp4a16+kv": ("nvfp4a16", {"kv": True}, "NVFP4A16"),
    "mxfp4a16+kv": ("mxfp4", {"kv": True}, "MXFP4A16"),
    "w4a16-awq-asym+kv": ("w4a16-awq", {"kv": True}, "W4A16_AWQ_G64_ASYM"),
}


def recipe_text(name: str) -> str:
    """The quantlab recipe YAML for a bench scheme: the shipped recipe with the scheme's edits."""
    base, edits, _ = SCHEMES[name]
    data = yaml.safe_load((ROOT / "recipes" / f"{base}.yaml").read_text())
    if "weights" in edits:
        data["quantization"]["schemes"][0]["weights"] = edits["weights"]
    if "stages" in edits:
        replaced = {"gptq", "rtn"} | {algo for stage in edits["stages"] for algo in stage}
        data["stages"] = [s for s in data["stages"] if not (replaced & set(s))] + edits["stages"]
    if edits.get("kv"):
        data["quantization"]["kv_cache"] = {"format": "fp8_e4m3", "granularity": "tensor"}
    return yaml.safe_dump(data, sort_keys=False)


def _ppl(model, ids) -> float:
    import torch

    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def _nll_wide(model, windows: list[list[int]]) -> list[float]:
    """Mean token NLL of each window, scored on its own; their mean's exp is the wide perplexity."""
    import torch

    with torch.no_grad():
        return [float(model(torch.tensor([w]), labels=torch.tensor([w])).loss) for w in windows]


def worker(name: str, samples_file: str, eval_file: str) -> dict:
    """Run quantlab on one scheme in this (fresh) process; return its result entry."""
    import torch

    from quantlab.data import CalibrationSet, digest
    from quantlab.fake_quant import decoded_weights
    from quantlab.models import load_model
    from quantlab.pipeline import calibrate
    from quantlab.recipe import load_recipe

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(recipe_text(name))
    recipe = load_recipe(f.name)
    os.unlink(f.name)
    model, _ = load_model(recipe.model)
    ids = torch.tensor(json.loads(Path(samples_file).read_text())["samples"])
    calib = CalibrationSet(ids, "bench", digest(ids))
    t0 = time.perf_counter()
    result = calibrate(model, recipe, calib, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before scoring, as the peers measure it
    data = json.loads(Path(eval_file).read_text())
    with decoded_weights(model):
        nll = _nll_wide(model, data["wide"])
        ppl = _ppl(model, torch.tensor([data["ids"]]))
    return {"ppl": ppl, "ppl_wide": math.exp(sum(nll) / len(nll)), "nll_wide": nll,
            "calib_seconds": round(seconds, 2),
            "peak_rss_mib": round(peak_rss_mib, 1),
            "notes": result.notes[:5]}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _prepare(num_samples: int, seq_len: int, workdir: Path) -> dict:
    """Write the shared calibration windows and eval tokens; return the float baseline and file paths."""
    import torch

    from quantlab.data import build_calibration_set, load_texts
    from quantlab.models import load_model, resolve_model
    from quantlab.recipe.schema import CalibrationConfig

    model, tok = load_model("smollm2-135m")
    calib = build_calibration_set(CalibrationConfig(num_samples=num_samples, seq_len=seq_len), tok)
    samples = workdir / "samples.json"
    _write_atomic(samples, json.dumps({"samples": calib.input_ids.tolist()}))
    eval_ids = tok("\n\n".join(load_texts(EVAL_TEXT)), add_special_tokens=False)["input_ids"][:EVAL_TOKENS]
    stream = [t for path in WIDE_TEXTS for t in tok("\n\n".join(load_texts(path)), add_special_tokens=False)["input_ids"]]
    wide = [stream[i:i + EVAL_TOKENS] for i in range(0, EVAL_TOKENS * WIDE_WINDOWS, EVAL_TOKENS)]
    eval_file = workdir / "eval_ids.json"
    _write_atomic(eval_file, json.dumps({"ids": eval_ids, "wide": wide}))
    return {"samples": str(samples), "eval": str(eval_file), "float_model": resolve_model("smollm2-135m"),
            "baseline_ppl": _ppl(model, torch.tensor([eval_ids])), "baseline_nll_wide": _nll_wide(model, wide),
            "calib_digest": calib.digest}


def _run_json(cmd: list[str], timeout: int) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-peer", action="store_true", help="run quantlab only")
    ap.add_argument("--no-quantlab", action="store_true", help="run the peer only")
    ap.add_argument("--modelopt", action="store_true", help="also run NVIDIA Model Optimizer where it has the scheme")
    ap.add_argument("--rerun", action="store_true", help="run entries already in the results file again")
    ap.add_argument("--rescore-peer", action="store_true",
                    help="score the peer checkpoints already saved (no calibration) where the wide perplexity is missing")
    ap.add_argument("--timeout", type=int, default=5400, help="seconds per tool and scheme")
    ap.add_argument("--table", action="store_true", help="print the results table and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--samples-file", help=argparse.SUPPRESS)
    ap.add_argument("--eval-file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps({"ok": True, **worker(args.worker, args.samples_file, args.eval_file)}))
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    if args.table:
        print(table(results))
        return 0
    workdir = ROOT / ".cache" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    setup = _prepare(args.num_samples, args.seq_len, workdir)
    results.update({"baseline_ppl": setup["baseline_ppl"], "baseline_nll_wide": setup["baseline_nll_wide"],
                    "baseline_ppl_wide": math.exp(sum(setup["baseline_nll_wide"]) / len(setup["baseline_nll_wide"])),
                    "calib_digest": setup["calib_digest"], "num_samples": args.num_samples, "seq_len": args.seq_len,
                    "eval": f"first {EVAL_TOKENS} tokens of {EVAL_TEXT}",
                    "eval_wide": f"{WIDE_WINDOWS} windows of {EVAL_TOKENS} tokens of {', '.join(WIDE_TEXTS)}",
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only"})
    _save(results)
    if args.rescore_peer:
        _rescore_peer(results, args.schemes.split(","), setup["eval"], workdir)
    for name in args.schemes.split(","):
        _, _, peer = SCHEMES[name]
        jobs = []
        if not args.no_quantlab:
            jobs.append(("quantlab", [sys.executable, __file__, "--worker", name, "--samples-file", setup["samples"], "--eval-file", setup["eval"]]))
        if peer and not args.no_peer:
            cmd = [str(PEER_PY), str(PEER_RUN), "--model-dir", setup["float_model"], "--scheme", peer,
                   "--samples-file", setup["samples"], "--eval-ids", setup["eval"], "--output", str(workdir / "peer" / name)]
            jobs.append(("llm-compressor", cmd + (["--kv-fp8"] if name.endswith("+kv") else [])))
        if args.modelopt and name in MODELOPT:
            jobs.append(("nvidia-modelopt", [str(MODELOPT_PY), str(MODELOPT_RUN), "--model-dir", setup["float_model"], "--scheme",
                                             MODELOPT[name], "--samples-file", setup["samples"], "--eval-ids", setup["eval"]]))
        for tool, cmd in jobs:
            key = f"{name}|{tool}"
            if key in results["runs"] and results["runs"][key].get("ok") and not args.rerun:
                continue
            print(f"[bench] {key} ...", file=sys.stderr, flush=True)
            try:
                entry = _run_json(cmd, args.timeout)
            except subprocess.TimeoutExpired:
                entry = {"ok": False, "error": f"timed out after {args.timeout} s"}
            entry["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
            entry["threads"] = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
            results["runs"][key] = entry
            _save(results, key)
            print(f"[bench] {key}: {json.dumps(entry)[:300]}", file=sys.stderr, flush=True)
    print(table(results))
    return 0


def _save(results: dict, key: str | None = None) -> None:
    """Merge into the results file under a lock: the run-wide fields, and ``key``'s entry if given.

    Two bench processes (say, one per tool) may run side by side; each re-reads the file here, so
    neither overwrites the other's entries.
    """
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        on_disk.update({k: v for k, v in results.items() if k != "runs"})
        if key is not None:
            on_disk["runs"][key] = results["runs"][key]
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(on_disk, indent=1))
        tmp.replace(RESULTS)
        results["runs"] = on_disk["runs"]


def _rescore_peer(results: dict, names: list[str], eval_file: str, workdir: Path) -> None:
    """Add the wide perplexity to peer entries whose checkpoint is still in the work directory."""
    for name in names:
        key = f"{name}|llm-compressor"
        entry, output = results["runs"].get(key), workdir / "peer" / name
        if not entry or not entry.get("ok") or "nll_wide" in entry or not (output / "config.json").is_file():
            continue
        print(f"[bench] rescoring {key} ...", file=sys.stderr, flush=True)
        _, _, peer = SCHEMES[name]
        scores = _run_json([str(PEER_PY), str(PEER_RUN), "--model-dir", ".", "--scheme", peer, "--output", str(output),
                            "--eval-ids", eval_file, "--score-only"], 3600)
        if scores.get("ok"):
            entry["ppl_wide"], entry["nll_wide"] = scores["ppl_wide"], scores["nll_wide"]
            _save(results, key)


def table(results: dict) -> str:
    """Markdown: one row per scheme, quantlab and llm-compressor side by side."""
    base, wide = results.get("baseline_ppl"), results.get("baseline_ppl_wide")
    rows = [f"Float baseline perplexity: {base:.3f} (first {EVAL_TOKENS} tokens), {wide:.3f} (wide)" if base and wide else "", "",
            "| scheme | quantlab PPL | Δ | wide Δ | time s | peak MiB | llm-compressor PPL | Δ | wide Δ | time s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SCHEMES:
        if SCHEMES[name][2] is None and f"{name}|quantlab" not in results["runs"]:
            continue  # a quantlab-only variant never run: nothing to show
        cells = [name]
        for tool in ("quantlab", "llm-compressor"):
            e = results["runs"].get(f"{name}|{tool}")
            if tool == "llm-compressor" and SCHEMES[name][2] is None:
                cells += ["(quantlab-only variant)", "", "", "", ""]
            elif e is None:
                cells += ["not run", "", "", "", ""]
            elif not e.get("ok") or e.get("ppl") is None:
                cells += [f"failed: {e.get('error', '')[:60]}", "", "", "", ""]
            else:
                wide_delta = f"{100 * (e['ppl_wide'] / wide - 1):+.1f}%" if "ppl_wide" in e and wide else "—"
                cells += [f"{e['ppl']:.3f}", f"{100 * (e['ppl'] / base - 1):+.1f}%", wide_delta, f"{e['calib_seconds']:.0f}",
                          f"{e['peak_rss_mib']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    rows += ["", "NVIDIA Model Optimizer, same samples and tokens (simulated quantization, scored in process):", "",
             "| scheme | ModelOpt scheme | PPL | Δ | wide Δ | time s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for name, scheme in MODELOPT.items():
        e = results["runs"].get(f"{name}|nvidia-modelopt")
        if e is None:
            rows.append(f"| {name} | {scheme} | not run |  |  |  |  |")
        elif not e.get("ok"):
            rows.append(f"| {name} | {scheme} | failed: {e.get('error', '')[:80]} |  |  |  |  |")
        else:
            rows.append(f"| {name} | {scheme} | {e['ppl']:.3f} | {100 * (e['ppl'] / base - 1):+.1f}% | "
                        f"{100 * (e['ppl_wide'] / wide - 1):+.1f}% | {e['calib_seconds']:.0f} | {e['peak_rss_mib']:.0f} |")
    rows += ["", "Paired over the wide windows: quantlab's perplexity relative to the peer's, exp(mean NLL difference) - 1,",
             "with +/- two standard errors of that mean (negative: quantlab lower).", "",
             "| scheme | vs llm-compressor | vs ModelOpt |", "|---|---|---|"]
    for name in SCHEMES:
        ours = results["runs"].get(f"{name}|quantlab", {}).get("nll_wide")
        cells = [_paired(ours, results["runs"].get(f"{name}|{tool}", {}).get("nll_wide")) for tool in ("llm-compressor", "nvidia-modelopt")]
        if any(cells):
            rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _paired(a: list[float] | None, b: list[float] | None) -> str:
    if not a or not b:
        return ""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return f"{100 * (math.exp(mean) - 1):+.2f}% ± {100 * 2 * se:.2f}%"


if __name__ == "__main__":
    sys.exit(main())
