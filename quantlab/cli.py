"""The ``quantlab`` command line. Each command parses flags, calls one function, and turns a
``QuantlabError`` into a one-line message and a non-zero exit code (never a traceback)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from .errors import QuantlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="quantlab: calibrate, evaluate and inspect quantized LLM checkpoints, driven by a YAML recipe.")


def _user_errors(fn):
    """Print a QuantlabError as one sentence on stderr and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantlabError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written at the output path", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command()
@_user_errors
def calibrate(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/fp8-dynamic.yaml")],
    model: Annotated[str | None, typer.Option(help="Override the recipe's model (name, local dir or hub id).")] = None,
    output: Annotated[str | None, typer.Option(help="Override the recipe's output directory.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Override calibration.num_samples.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Override calibration.seq_len.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Calibrate a model layer by layer and write a quantized checkpoint."""
    import torch

    from .checkpoint.writer import check_output, write_checkpoint
    from .data import build_calibration_set
    from .models import default_device, load_model, torch_dtype
    from .pipeline import calibrate as run_calibration
    from .recipe import load_recipe

    overrides = {k: v for k, v in {"model": model, "output": output, "calibration.num_samples": num_samples,
                                   "calibration.seq_len": seq_len}.items() if v is not None}
    r = load_recipe(recipe, overrides)
    check_output(r.output, overwrite)
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantlabError("--device cuda was asked for, but no CUDA device is available")
    m, tokenizer = load_model(r.model, torch_dtype(r.dtype, dev), r.trust_remote_code)
    calib = build_calibration_set(r.calibration, tokenizer, m)
    typer.echo(f"calibrating {r.model} with {recipe} on {dev}: {len(calib.input_ids)} x {calib.input_ids.shape[1]} tokens of {calib.source}")
    result = run_calibration(m, r, calib, dev, progress=not quiet)
    summary = write_checkpoint(m, tokenizer, r, calib, result, r.output, overwrite=overwrite)
    worst = sorted(result.layers, key=lambda s: s.rel_mse, reverse=True)[:3]
    typer.echo(f"calibrated {len(result.layers)} layers in {result.seconds:.1f} s, peak memory {result.peak_mem_mib:.0f} MiB")
    typer.echo("highest layer output error (relative MSE): " + ", ".join(f"{s.name} {s.rel_mse:.2e}" for s in worst))
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {summary.path} ({_human_bytes(summary.bytes)})")


@app.command()
@_user_errors
def inspect(checkpoint: Annotated[Path, typer.Argument(help="A quantlab checkpoint directory.")]) -> None:
    """Print per-module formats, bytes before/after and the compression ratio of a checkpoint."""
    from .checkpoint.inspect import format_report, inspect_checkpoint

    typer.echo(format_report(inspect_checkpoint(checkpoint)))


@app.command(name="eval")
@_user_errors
def evaluate(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint directory (several with --compare).")],
    output: Annotated[str | None, typer.Option(help="Report directory (default: <checkpoint>/eval).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Take eval settings and gates from this recipe instead of the checkpoint's.")] = None,
    original: Annotated[str | None, typer.Option(help="The original model, if not the one quantlab.json names.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated lm-eval tasks (overrides the recipe's).")] = None,
    limit: Annotated[int | None, typer.Option(help="lm-eval examples per task.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Perplexity token budget.")] = None,
    compare: Annotated[bool, typer.Option(help="Put several checkpoints side by side against one baseline.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report directory.")] = False,
    cache: Annotated[bool, typer.Option(help="Reuse the original model's results from earlier evaluations "
                                             "(kept under the quantlab cache).")] = True,
    quiet: Annotated[bool, typer.Option(help="Print only the closing summary (also the case when stdout is not a terminal).")] = False,
) -> None:
    """Compare a quantized checkpoint with its original model and apply the recipe's gates.

    Exit code 0: all gates pass; 3: a gate failed; 2: bad input.
    """
    import shlex
    import sys

    from .evaluation.compare import run_compare
    from .evaluation.progress import wanted
    from .evaluation.run import run_eval

    task_list = None if tasks is None else [t for t in tasks.split(",") if t]
    progress = wanted(quiet)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if compare:
        report, code = run_compare([str(c) for c in checkpoints], output=output, original=original, tasks=task_list,
                                   limit=limit, max_tokens=max_tokens, overwrite=overwrite, progress=progress,
                                   recipe_path=None if recipe is None else str(recipe))
    else:
        if len(checkpoints) != 1:
            raise QuantlabError(f"eval takes one checkpoint (got {len(checkpoints)}); pass --compare to compare several")
        report, code = run_eval(str(checkpoints[0]), output=output, recipe_path=None if recipe is None else str(recipe),
                                original=original, tasks=task_list, limit=limit, max_tokens=max_tokens,
                                overwrite=overwrite, progress=progress, cache=cache,
                                command=shlex.join(["quantlab", *sys.argv[1:]]))
    typer.echo(report.summary())
    raise typer.Exit(code)


from . import cli_engine  # noqa: E402,F401  (registers build, generate, verify, keygen, run)
from . import cli_serve  # noqa: E402,F401  (registers serve and bench)


def main() -> None:
    """Console entry point."""
    app(prog_name="quantlab")

