"""The engine's commands: ``build``, ``generate``, ``verify``, ``keygen`` and ``run`` (calibrate -> eval -> build).

They live beside ``quantlab.cli`` (which imports this module) so the engine's flags do not crowd the
quantization commands; each parses flags, calls one function and lets ``_user_errors`` turn a
``QuantlabError`` into one sentence and its exit code.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .cli import _human_bytes, _user_errors, app
from .errors import QuantlabError

_BUILD_FLAGS = ("max_batch_size", "max_seq_len", "max_num_tokens", "tokens_per_block", "kv_cache_dtype", "dtype",
                "device")


def _build_options(recipe_build, flags: dict):
    """The recipe's ``build:`` section (or the defaults) with the given flags on top, validated."""
    from dataclasses import asdict

    from .recipe.validate import Violation, build_options

    data = asdict(recipe_build) if recipe_build is not None else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return build_options(data)
    except Violation as v:
        got = "" if v.got is None else f" (got {v.got!r})"
        raise QuantlabError(f"{v.key_path.replace('build.', '--').replace('_', '-')} {v.expected}{got}") from None


def _build(source: str, output: Path, options, overwrite: bool, skip_gates: bool, sign_key: Path | None) -> None:
    from .engine.builder import build_engine

    s = build_engine(source, output, options, overwrite=overwrite, skip_gates=skip_gates, sign_key=sign_key)
    c = s.config
    fused = "" if not c.fusion else \
        f"; {len(c.fusion)} projections stored unfused (engine.json 'fusion' says why, e.g. {min(c.fusion.values())})"
    kv = c.kv_cache_dtype if c.kv_cache_dtype != "bf16" else f"{c.dtype} (unquantized)"
    target = c.target["device"] if c.target["device"] == "cpu" else f"{c.target['device']} sm {c.target['compute_capability']}"
    typer.echo(f"built {s.path} ({_human_bytes(s.bytes)}) in {s.seconds:.1f} s: {c.model.architecture}, {c.dtype}, "
               f"KV {kv}, target {target}"
               f"{', gates skipped' if c.skip_gates else ''}{fused}")


@app.command()
@_user_errors
def build(
    source: Annotated[str, typer.Argument(help="A quantlab checkpoint, a local HF model directory, or smollm2-135m.")],
    output: Annotated[Path, typer.Option(help="Engine directory to write.")],
    recipe: Annotated[Path | None, typer.Option(help="Take defaults from this recipe's build: section.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Most sequences per step (default 64).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Most tokens per sequence (default 2048).")] = None,
    max_num_tokens: Annotated[int | None, typer.Option(help="Tokens per step, the chunked-prefill budget (default 2048).")] = None,
    tokens_per_block: Annotated[int | None, typer.Option(help="Tokens per KV-cache block (default 16).")] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(help="auto, bf16 or fp8_e4m3 (default auto).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Compute dtype: bfloat16, float16 or float32 (default bfloat16).")] = None,
    device: Annotated[str | None, typer.Option(help="Target: auto, cuda or cpu (default auto).")] = None,
    sign_key: Annotated[Path | None, typer.Option(help="Ed25519 private key (quantlab keygen) to sign the manifest.")] = None,
    skip_gates: Annotated[bool, typer.Option(help="Build a quantized checkpoint without a passing evaluation (recorded).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing engine directory.")] = False,
) -> None:
    """Compile a checkpoint (or an unquantized model) into a pinned engine directory.

    Exit code 0: built; 3: the checkpoint has no passing evaluation of its exact bytes; 2: bad input.
    """
    from .recipe import load_recipe

    base = load_recipe(recipe).build if recipe is not None else None
    flags = {k: v for k, v in locals().items() if k in _BUILD_FLAGS}
    _build(source, output, _build_options(base, flags), overwrite, skip_gates, sign_key)


@app.command()
@_user_errors
def keygen(output: Annotated[Path, typer.Option(help="Directory for engine-signing.key and engine-signing.pub.")]) -> None:
    """Make an Ed25519 key pair for signing engines (build --sign-key) and checking them (--public-key)."""
    from .engine.manifest import keygen as make_keys

    private, public = make_keys(output)
    typer.echo(f"wrote {private} (keep it secret) and {public}")


@app.command()
@_user_errors
def generate(
    engine: Annotated[Path, typer.Argument(help="An engine directory (quantlab build).")],
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template as a user turn.")] = False,
    public_key: Annotated[Path | None, typer.Option(help="Check the engine's signature against this key.")] = None,
    require_signature: Annotated[bool, typer.Option(help="Refuse an engine whose signature is not checked.")] = False,
) -> None:
    """Print a completion of PROMPT (streamed token by token to a terminal)."""
    from .engine.llm import LLMEngine
    from .engine.sampling import SamplingParams

    llm = LLMEngine(engine, public_key=public_key, require_signature=require_signature)
    typer.echo(f"loaded {engine} in {llm.load_seconds:.2f} s", err=True)
    text = llm.chat_token_ids([{"role": "user", "content": prompt}]) if chat else prompt
    llm.add_request("cli", text, SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens))
    stream, shown, start, out = sys.stdout.isatty(), "", time.perf_counter(), None
    while llm.has_unfinished():
        for out in llm.step():
            if stream:
                text_now = out.outputs[0].text
                sys.stdout.write(text_now[len(shown):])
                sys.stdout.flush()
                shown = text_now
    if out is None:
        return
    if not stream:
        sys.stdout.write(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    sys.stdout.write("\n")
    typer.echo(f"{n} tokens in {time.perf_counter() - start:.2f} s ({out.outputs[0].finish_reason})", err=True)


@app.command()
@_user_errors
def verify(
    engine: Annotated[Path, typer.Argument(help="An engine directory.")],
    against: Annotated[Path, typer.Option(help="The checkpoint (or unquantized model) the engine was built from.")],
    num_prompts: Annotated[int, typer.Option(help="Prompts drawn from calib_data/heldout/.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt.")] = 24,
    threshold: Annotated[float | None, typer.Option(help="Least fraction of tokens within the gap (default: see docs/engine.md).")] = None,
    logprob_gap: Annotated[float | None, typer.Option(help="Largest log-probability gap to the reference's argmax.")] = None,
    reference_dtype: Annotated[str | None, typer.Option(help="Dtype the reference computes in: float32, bfloat16 or float16 (default float32 in sequence order, the engine's dtype in engine order).")] = None,
    reference_order: Annotated[str, typer.Option(help="sequence (one forward per whole sequence), engine (batched prefill, then one token per step, rounded as the engine rounds; CPU engines of Llama checkpoints) or auto (engine for 4-bit activations, else sequence).")] = "auto",
) -> None:
    """Teacher-forced check that the engine's greedy tokens are ones the reference model would pick.

    Exit code 0: at or above the threshold; 3: below it; 2: bad input.
    """
    import torch

    from .engine.verify import DEFAULT_GAP, DEFAULT_THRESHOLD
    from .engine.verify_order import verify as run_verify

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if reference_dtype is not None and reference_dtype not in dtypes:
        raise QuantlabError(f"--reference-dtype must be one of {', '.join(dtypes)} (got {reference_dtype!r})")
    result, note = run_verify(engine, against, reference_order, num_prompts=num_prompts, max_tokens=max_tokens,
                              logprob_gap=DEFAULT_GAP if logprob_gap is None else logprob_gap,
                              reference_dtype=dtypes.get(reference_dtype))
    if note:
        typer.echo(note)
    typer.echo(result.summary())
    limit = DEFAULT_THRESHOLD if threshold is None else threshold
    passed = result.within_gap >= limit
    typer.echo(f"{'PASS' if passed else 'FAIL'}: {result.within_gap:.1%} of tokens within the gap "
               f"({'>=' if passed else '<'} {limit:.1%})")
    raise typer.Exit(0 if passed else 3)


@app.command(name="run")
@_user_errors
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe.")],
    engine_output: Annotated[Path | None, typer.Option(help="Engine directory (default <output>-engine).")] = None,
    sign_key: Annotated[Path | None, typer.Option(help="Ed25519 private key to sign the engine.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing checkpoint, report and engine directories.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The whole loop from one file: calibrate -> eval (gates) -> build, stopping at the first failure.

    Exit code 0: an engine was built; 3: a gate failed (nothing is built); 2: bad input.
    """
    from .cli import calibrate
    from .evaluation.run import run_eval
    from .recipe import load_recipe

    r = load_recipe(recipe)
    options = _build_options(r.build, {})
    out = engine_output or Path(r.output).with_name(Path(r.output).name + "-engine")
    typer.echo(f"[1/3] calibrate {recipe} -> {r.output}")
    calibrate(recipe, overwrite=overwrite, quiet=quiet)
    typer.echo(f"[2/3] eval {r.output}")
    report, code = run_eval(r.output, overwrite=overwrite, progress=not quiet)
    typer.echo(report.summary() if hasattr(report, "summary") else str(report))
    if code != 0:
        typer.echo("stopped: the checkpoint failed its gates, so no engine was built", err=True)
        raise typer.Exit(code)
    typer.echo(f"[3/3] build {r.output} -> {out}")
    _build(r.output, out, options, overwrite, False, sign_key)
