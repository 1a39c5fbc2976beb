"""Issue 17's H200 serving measurements: Llama-3-8B-shaped engines, batch-1 decode against the bandwidth
limit, offline throughput sweeps beside HF ``generate``, and an online request-rate sweep.

A plan is a comma-separated list of stages, run in order until the time budget is spent (a device call
lasts at most 10 minutes, so the matrix is split over calls that share --workdir on the warm machine;
a stage whose output exists is skipped):

    source                       random Llama-3-8B-shaped BF16 HF model (16 GB) in WORKDIR/src
    ckpt:NAME                    a checkpoint of it (fp8 = W8A8 static + FP8 KV, int8, w4a16 = INT4 g128 RTN,
                                 nvfp4 = NVFP4 weights), calibrated on the GPU with a few samples
    build:NAME                   engine WORKDIR/eng-NAME (also bf16, and bf16kv8 = BF16 weights, FP8 KV)
    decode:NAME                  batch-1 decode tok/s against the bandwidth limit of the same run (bf16: and
                                 HF generate of the source in the same process)
    offline:NAME:SHAPE[:C/C..]   `quantlab bench` offline at concurrencies C (default 1/16/64/256), SHAPE
                                 = INxOUT; bf16 at 512x128 adds the HF baseline (--baseline hf)
    kvbudget:NAME:MIB            `quantlab bench` offline at 2048x256, 128 requests, up to 128 at once, with the KV
                                 pool fixed at MIB (--kv-cache-mib): bf16 against bf16kv8 holds twice the sequences
    online:NAME                  `quantlab bench` online, Poisson rates 1/4/16/64/inf at 512x128
    profile:NAME[:B[:CTX[:eager]]]  bench/profile_step.py: where a decode step of B sequences (default 256)
                                 of CTX prompt tokens (default 1500) spends its time (host phases, GPU kernels)
    rm:DIR                       delete WORKDIR/DIR (the disk holds 64 GiB)

    python bench/serving_h200.py --out bench/results/serving_h200 --budget-s 540 --plan source,build:bf16,...

Results: one JSON per stage under --out (decode-NAME.json, the bench directories) and stages.json with
every stage's command, seconds and exit status. A bench results.json holds every request's timings (14 MB
for 512 requests of 1000 tokens): gzip it before committing it (bench/results/serving_h200/*.json.gz). QL_SHAPE=tiny --device cpu runs the same plan on a toy model
of the same architecture: a dry run of the script, never a figure. Random weights run at the speed of
trained ones (the traffic and arithmetic do not depend on the values); correctness is shown on the real
default model (bench/real_model.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"fp8": "fp8-static", "int8": "w8a8-int8", "w4a16": "w4a16-rtn", "nvfp4": "nvfp4a16"}
QL = [sys.executable, "-m", "quantlab"]


def _requests(c: int) -> int:
    """Requests at concurrency c: two full waves (two requests alone at c=1, where HF's baseline decodes at
    ~11 tok/s), so the steady state dominates."""
    return 2 * c


def stage_command(stage: str, work: Path, out: Path, device: str) -> list[str] | None:
    """The subprocess of a stage, or None when its output already exists."""
    kind, *args = stage.split(":")
    if kind == "source":
        if (work / "src" / "config.json").exists():
            return None
        return [sys.executable, __file__, "--write-source", str(work / "src"), "--device", device]
    if kind == "ckpt":
        (name,) = args
        if (work / f"ckpt-{name}" / "quantlab.json").exists() or (work / f"eng-{name}" / "engine.json").exists():
            return None
        return QL + ["calibrate", f"recipes/{RECIPES[name]}.yaml", "--model", str(work / "src"), "--output",
                     str(work / f"ckpt-{name}"), "--num-samples", "8", "--seq-len", "256", "--device", device,
                     "--quiet", "--overwrite"]
    if kind == "build":
        (name,) = args
        if (work / f"eng-{name}" / "engine.json").exists():
            return None
        src = work / ("src" if name in ("bf16", "bf16kv8") else f"ckpt-{name}")
        kv = ["--kv-cache-dtype", "fp8_e4m3"] if name == "bf16kv8" else []
        return QL + ["build", str(src), "--output", str(work / f"eng-{name}"), "--max-batch-size", "256",
                     "--max-seq-len", "5120", "--max-num-tokens", "8192", "--device", device, "--skip-gates",
                     "--overwrite"] + kv
    if kind == "decode":
        (name,) = args
        hf = ["--hf-source", str(work / "src")] if name == "bf16" else []  # HF generate beside it, same process
        return [sys.executable, __file__, "--decode", str(work / f"eng-{name}"), "--json", str(out / f"decode-{name}.json")] + hf
    if kind == "offline":
        name, shape, *cs = args
        conc = [int(c) for c in (cs[0].split("/") if cs else ("1", "16", "64", "256"))]
        n_in, n_out = shape.split("x")
        cmd = QL + ["bench", str(work / f"eng-{name}"), "--mode", "offline", "--input-len", n_in, "--output-len", n_out,
                    "--concurrency", ",".join(map(str, conc)), "--num-requests", ",".join(str(_requests(c)) for c in conc),
                    "--output", str(out / f"offline-{name}-{shape}"), "--overwrite", "--quiet"]
        if name == "bf16" and shape == "512x128":
            cmd += ["--baseline", "hf", "--hf-model", str(work / "src")]
        return cmd
    if kind == "kvbudget":
        name, mib = args
        return QL + ["bench", str(work / f"eng-{name}"), "--mode", "offline", "--input-len", "2048", "--output-len", "256",
                     "--concurrency", "128", "--num-requests", "128", "--kv-cache-mib", mib,
                     "--output", str(out / f"kvbudget-{name}-{mib}MiB"), "--overwrite", "--quiet"]
    if kind == "online":
        (name,) = args
        return QL + ["bench", str(work / f"eng-{name}"), "--mode", "online", "--input-len", "512", "--output-len", "128",
                     # ~16 s of arrivals at the low rates, 256 requests at once at the end
                     "--num-requests", "16,64,256,256,256", "--request-rate", "1,4,16,64,inf", "--output",
                     str(out / f"online-{name}-512x128"), "--overwrite", "--quiet"]
    if kind == "profile":
        name, *rest = args
        batch, ctx, *eager = rest + ["256", "1500"][len(rest):]
        tag = f"{name}-{batch}x{ctx}" + ("-eager" if eager else "")
        return [sys.executable, str(Path(__file__).parent / "profile_step.py"), str(work / f"eng-{name}"), "--batch", batch,
                "--context", ctx, "--out", str(out / f"profile-{tag}.json"), "--trace", str(out / f"trace-{tag}.json.gz")] + \
            (["--eager"] if eager else [])
    raise SystemExit(f"unknown stage {stage!r} (see the module docstring)")


def run_plan(plan: list[str], work: Path, out: Path, budget_s: float, device: str) -> list[dict]:
    """Run the stages in order while the budget lasts; each stage's record is saved as soon as it ends."""
    deadline = time.time() + budget_s
    log_path = out / "stages.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    for stage in plan:
        left = deadline - time.time()
        if left < 20:
            log.append({"stage": stage, "skipped": "time budget spent"})
            continue
        t0 = time.time()
        if stage.startswith("rm:"):
            shutil.rmtree(work / stage[3:], ignore_errors=True)
            continue
        cmd = stage_command(stage, work, out, device)
        rec = {"stage": stage, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if cmd is not None:
            rec["command"] = " ".join(cmd)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
                rec["rc"], rec["tail"] = p.returncode, (p.stdout + p.stderr)[-1500:]
            except subprocess.TimeoutExpired:
                rec["rc"], rec["tail"] = "timeout", "stopped at the call's time budget"
        rec["seconds"] = round(time.time() - t0, 1)
        print(f"[{stage}] {rec['seconds']} s rc={rec.get('rc', '-')}", flush=True)
        log.append(rec)
        log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def decode(engine_dir: Path, json_path: Path, hf_source: Path | None = None, prompt_tokens: int = 128,
           new_tokens: int = 256) -> None:
    """Batch-1 decode of one engine beside the bandwidth limit (copy bandwidth measured in this process) and,
    with ``hf_source``, beside transformers ``generate`` of that model in the same process afterwards."""
    import gc

    import torch

    from engine_speed import bytes_per_step, copy_bandwidth, engine_decode, hf_decode

    prompt = torch.randint(0, 1000, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    res = engine_decode(engine_dir, prompt, new_tokens)
    torch.cuda.empty_cache()
    bw = copy_bandwidth()
    step = bytes_per_step(res, prompt_tokens, new_tokens)
    res.update(engine=str(engine_dir), copy_bandwidth_gb_s=bw / 1e9, bytes_per_step_gb=step / 1e9,
               bandwidth_limit_tok_s=bw / step, fraction_of_limit=res["decode_tok_s"] * step / bw,
               device=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=f"python bench/serving_h200.py --decode {engine_dir}")
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    if hf_source is not None:
        gc.collect()  # the engine's GPU memory back before HF loads its copy of the weights
        torch.cuda.empty_cache()
        try:
            res["hf_generate"] = hf_decode(hf_source, prompt, new_tokens, static=False)
            res["engine_over_hf"] = res["decode_tok_s"] / res["hf_generate"]["decode_tok_s"]
        except Exception as e:  # noqa: BLE001 - record why the baseline is missing, keep the engine's figures
            res["hf_generate"] = {"error": str(e).splitlines()[0]}
        json_path.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", help="comma-separated stages")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/quantlab-h200"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/serving_h200"))
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--write-source", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--decode", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hf-source", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.write_source:
        from engine_speed import SHAPE, TINY_SHAPE, write_random_llama

        write_random_llama(args.write_source, TINY_SHAPE if os.environ.get("QL_SHAPE") == "tiny" else SHAPE,
                           device=args.device)
    elif args.decode:
        decode(args.decode, args.json, args.hf_source)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
        run_plan(args.plan.split(","), args.workdir, args.out, args.budget_s, args.device)


if __name__ == "__main__":
    main()
