"""``quantlab eval``: how much did a checkpoint lose against its original model, and may it be promoted?

``run_eval`` reads the checkpoint's quantlab.json for the original model and the recipe that made it,
takes the evaluation settings and gates from that recipe (or from ``--recipe``), measures both models
over the same held-out windows and lm-eval tasks, writes the report and returns the exit code:
0 all gates pass, 3 a gate failed (2 is a user error, raised as ``QuantlabError``). ``run_compare`` puts
several checkpoints of one original model side by side.

This is the only module of quantlab.evaluation that touches checkpoint paths; the measuring functions
take model objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quantlab import __version__
from quantlab.checkpoint.reader import load_quantized, shard_files
from quantlab.data import resolve_data_path
from quantlab.errors import CheckpointError, QuantlabError, RecipeError
from quantlab.fake_quant import decoded_weights
from quantlab.models import DEFAULT_MODEL, default_device, load_model
from quantlab.recipe.schema import EvalConfig, Recipe

from .gates import Metrics, check_gates, primary_metric, task_recovery
from .perplexity import ORIGINAL, EvalTokens, ModelScores, dataset_files, load_eval_tokens, score
from .report import Report, check_output, write_report
from .tasks import run_tasks

EXIT_PASS, EXIT_GATE_FAILED = 0, 3


def _read_provenance(checkpoint: Path) -> dict:
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    path = checkpoint / "quantlab.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: {checkpoint} is not a quantlab checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None


def _overrides(tasks: list[str] | None, limit: int | None, max_tokens: int | None) -> dict:
    return {k: v for k, v in {"eval.tasks": tasks, "eval.limit": limit, "eval.max_tokens": max_tokens}.items()
            if v is not None}


def load_checkpoint_recipe(checkpoint: Path, provenance: dict, recipe_path: str | None,
                           overrides: dict) -> tuple[Recipe, str]:
    """The recipe whose ``eval`` section applies, and a label saying where it came from.

    ``recipe_path`` wins; otherwise the recipe text embedded in quantlab.json is parsed (at its original
    path when that file still holds the same bytes, so messages name it; else from a temporary copy,
    with messages naming quantlab.json).
    """
    from quantlab.recipe.load import load_recipe

    if recipe_path is not None:
        return load_recipe(recipe_path, overrides), recipe_path
    embedded = provenance.get("recipe") or {}
    where = checkpoint / "quantlab.json"
    if not embedded.get("text"):
        raise RecipeError(str(where), None, "recipe.text", "is missing, so the eval settings are unknown; pass --recipe")
    original = embedded.get("path") or "recipe.yaml"
    p = Path(original)
    if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == embedded.get("sha256"):
        return load_recipe(p, overrides), f"{original} (embedded in {where})"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / p.name
        tmp.write_text(embedded["text"], encoding="utf-8")
        try:
            return load_recipe(tmp, overrides), f"the recipe embedded in {where} ({original})"
        except RecipeError as e:
            raise RecipeError(e.file.replace(str(tmp), f"{where} [recipe {original}]"), e.line, e.key_path,
                              e.expected, e.got) from None


def original_source(checkpoint: Path, provenance: dict, original: str | None) -> tuple[str, str]:
    """(name, what to load) of the original model: ``--original``, else quantlab.json's ``model``."""
    if original is not None:
        return original, original
    model = provenance.get("model")
    name, path = (model.get("name"), model.get("path")) if isinstance(model, dict) else (model, None)
    if not name and not path:
        raise CheckpointError(f"{checkpoint / 'quantlab.json'} names no original model; pass --original")
    if path and Path(path).is_dir():
        return name or path, path
    if name == DEFAULT_MODEL or (name and Path(name).expanduser().is_dir()):
        return name, name  # the default is re-converted into the cache when missing
    if name and path in (None, name) and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return name, name  # a hub id: transformers resolves it (network or HF cache)
    looked = path or name
    raise CheckpointError(f"the original model of {checkpoint} was not found at {looked}; pass --original")


def _load_original(name: str, source: str):
    try:
        return load_model(source, torch.float32)
    except CheckpointError as e:
        raise CheckpointError(f"the original model {name} could not be loaded from {source} ({e}); pass --original") from None


def _refuse_calibration_text(ev: EvalConfig, recipe: Recipe, provenance: dict) -> None:
    """Evaluating on the text the checkpoint was calibrated on would flatter it: refuse."""
    calib = set()
    for source in ((provenance.get("calibration") or {}).get("source"), recipe.calibration.dataset):
        try:
            calib.add(resolve_data_path(source).resolve())
        except (QuantlabError, TypeError):
            pass  # self-generated, or a file that is gone
    for f in dataset_files(ev.dataset):
        if f.resolve() in calib:
            raise QuantlabError(f"eval.dataset {f} is the calibration text of this checkpoint; "
                                "evaluate on held-out text such as calib_data/heldout/")


def _versions() -> dict[str, str | None]:
    def v(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"quantlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": v("transformers"), "lm_eval": v("lm_eval"), "datasets": v("datasets")}


def _settings(ev: EvalConfig, batch_size: int) -> dict:
    return {"dataset": ev.dataset, "context_len": ev.context_len, "stride": ev.stride, "max_tokens": ev.max_tokens,
            "tasks": list(ev.tasks), "limit": ev.limit, "seed": ev.seed, "batch_size": batch_size}


def _data(ev: EvalConfig, tokens: EvalTokens, num_scored: int) -> dict:
    return {"files": [str(f) for f in dataset_files(ev.dataset)], "num_docs": len(tokens.docs),
            "num_tokens": tokens.num_tokens, "num_scored": num_scored, "token_sha256": tokens.digest}


def _ppl(s: ModelScores) -> dict:
    return {"perplexity": s.perplexity, "nll": s.nll, "doc_spread": s.doc_spread(),
            "doc_perplexity": list(s.doc_perplexity)}


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes of the checkpoint's safetensors files on disk."""
    return sum(f.stat().st_size for f in shard_files(checkpoint))


def run_eval(checkpoint: str, output: str | None = None, recipe_path: str | None = None, original: str | None = None,
             tasks: list[str] | None = None, limit: int | None = None, max_tokens: int | None = None,
             overwrite: bool = False, *, batch_size: int = 8, device: str | None = None,
             progress: bool = True) -> tuple[Report, int]:
    """Evaluate one checkpoint against its original model and write the report.

    Args:
        checkpoint: a quantlab checkpoint directory.
        output: report directory (default ``<checkpoint>/eval``); refused if it exists unless ``overwrite``.
        recipe_path: take eval settings and gates from this recipe instead of the embedded one.
        original: the original model (name or directory) instead of the one quantlab.json names.
        tasks, limit, max_tokens: override ``eval.tasks``, ``eval.limit``, ``eval.max_tokens``.
        batch_size: perplexity windows / lm-eval requests per forward pass.
        device: ``cpu`` or ``cuda`` (default: CUDA when available). Both models are evaluated in float32.

    Returns:
        (report, exit code): 0 when every gate passes, 3 when one fails.
    """
    started = time.time()
    ckpt = Path(checkpoint)
    provenance = _read_provenance(ckpt)
    out = check_output(output if output is not None else ckpt / "eval", overwrite)
    recipe, recipe_source = load_checkpoint_recipe(ckpt, provenance, recipe_path, _overrides(tasks, limit, max_tokens))
    ev = recipe.eval
    _refuse_calibration_text(ev, recipe, provenance)
    name, source = original_source(ckpt, provenance, original)
    dev = torch.device(device) if device else default_device()

    base_model, tokenizer = _load_original(name, source)
    base_model.to(dev)
    quant_model, _, _ = load_quantized(ckpt, torch.float32, dev)
    tokens = load_eval_tokens(ev.dataset, tokenizer, ev.max_tokens)
    with decoded_weights(quant_model):
        scores = score(base_model, {"quantized": quant_model}, tokens, ev.context_len, ev.stride, batch_size, progress)
        quant_tasks = run_tasks(quant_model, tokenizer, ev.tasks, ev.limit, ev.seed, batch_size)
    base_tasks = run_tasks(base_model, tokenizer, ev.tasks, ev.limit, ev.seed, batch_size)

    q = scores["quantized"]
    verdicts = check_gates(Metrics(scores[ORIGINAL].perplexity, tasks=base_tasks),
                           Metrics(q.perplexity, q.kl, q.top1_agreement, quant_tasks), ev.gates)
    passed = all(g.passed for g in verdicts)
    code = EXIT_PASS if passed else EXIT_GATE_FAILED
    recipe_record = provenance.get("recipe") or {}
    data = {
        "kind": "eval",
        "checkpoint": {"path": str(ckpt), "bytes": checkpoint_bytes(ckpt)},
        "original": {"name": name, "path": source},
        "recipe": {"source": recipe_source, "path": recipe_record.get("path"),
                   "sha256": recipe.sha256 if recipe_path else recipe_record.get("sha256", recipe.sha256)},
        "settings": _settings(ev, batch_size),
        "data": _data(ev, tokens, q.num_scored),
        "perplexity": {ORIGINAL: _ppl(scores[ORIGINAL]), "quantized": _ppl(q)},
        "kl": q.kl,
        "top1_agreement": q.top1_agreement,
        "tasks": {ORIGINAL: base_tasks, "quantized": quant_tasks, "recovery_pct": task_recovery(base_tasks, quant_tasks),
                  "primary": {t: primary_metric(m) for t, m in base_tasks.items()}},
        "gates": [asdict(g) for g in verdicts],
        "passed": passed,
        "exit_code": code,
        "layers": provenance.get("layers") or [],
        "calibration": provenance.get("calibration"),
        "versions": _versions(),
        "seconds": time.time() - started,
    }
    return write_report(data, out, overwrite), code


def run_compare(checkpoints: list[str], output: str | None = None, original: str | None = None,
                tasks: list[str] | None = None, limit: int | None = None, max_tokens: int | None = None,
                overwrite: bool = False, *, recipe_path: str | None = None, batch_size: int = 8,
                device: str | None = None, progress: bool = True) -> tuple[Report, int]:
    """Several checkpoints of one original model side by side, sorted by size, Pareto front marked.

    The evaluation settings (dataset, windows, tasks) come from ``recipe_path`` or else from the first
    checkpoint's recipe, so every checkpoint is measured on the same tokens; each checkpoint's gates
    come from its own recipe. All models are held in memory at once: the original runs once per window.
    The report goes to ``output`` (default ``eval-compare`` beside the first checkpoint).

    Returns:
        (report, exit code): 0 when every checkpoint passes its gates, 3 when one fails.
    """
    if len(checkpoints) < 2:
        raise QuantlabError(f"--compare needs two or more checkpoints (got {len(checkpoints)})")
    started = time.time()
    paths = [Path(c) for c in checkpoints]
    provs = [_read_provenance(p) for p in paths]
    out = check_output(output if output is not None else paths[0].parent / "eval-compare", overwrite)
    overrides = _overrides(tasks, limit, max_tokens)
    recipes = [load_checkpoint_recipe(p, prov, recipe_path, overrides)[0] for p, prov in zip(paths, provs)]
    sources = [original_source(p, prov, original) for p, prov in zip(paths, provs)]
    if len({s for _, s in sources}) > 1:
        raise QuantlabError("the checkpoints come from different original models (" + ", ".join(
            f"{p}: {s}" for p, (_, s) in zip(paths, sources)) + "); compare checkpoints of one model")
    ev = recipes[0].eval
    for r, prov in zip(recipes, provs):
        _refuse_calibration_text(ev, r, prov)
    names = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    dev = torch.device(device) if device else default_device()

    base_model, tokenizer = _load_original(*sources[0])
    base_model.to(dev)
    models = {n: load_quantized(p, torch.float32, dev)[0] for n, p in zip(names, paths)}
    tokens = load_eval_tokens(ev.dataset, tokenizer, ev.max_tokens)
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(decoded_weights(m))
        scores = score(base_model, models, tokens, ev.context_len, ev.stride, batch_size, progress)
    base_tasks = run_tasks(base_model, tokenizer, ev.tasks, ev.limit, ev.seed, batch_size)
    base = Metrics(scores[ORIGINAL].perplexity, tasks=base_tasks)

    entries = []
    for n, p, prov, r in zip(names, paths, provs, recipes):
        s = scores[n]
        with decoded_weights(models[n]):
            qt = run_tasks(models[n], tokenizer, ev.tasks, ev.limit, ev.seed, batch_size)
        verdicts = check_gates(base, Metrics(s.perplexity, s.kl, s.top1_agreement, qt), r.eval.gates)
        entries.append({"name": n, "path": str(p), "bytes": checkpoint_bytes(p), **_ppl(s), "kl": s.kl,
                        "top1_agreement": s.top1_agreement, "tasks": qt, "task_recovery_pct": task_recovery(base_tasks, qt),
                        "gates": [asdict(g) for g in verdicts], "passed": all(g.passed for g in verdicts),
                        "recipe_sha256": (prov.get("recipe") or {}).get("sha256", r.sha256)})
    entries.sort(key=lambda e: e["bytes"])
    from .plots import pareto_front

    for e, on in zip(entries, pareto_front([(e["bytes"], e["perplexity"]) for e in entries])):
        e["pareto"] = on
    code = EXIT_PASS if all(e["passed"] for e in entries) else EXIT_GATE_FAILED
    data = {
        "kind": "compare",
        "original": {"name": sources[0][0], "path": sources[0][1], **_ppl(scores[ORIGINAL]), "tasks": base_tasks},
        "settings": _settings(ev, batch_size),
        "data": _data(ev, tokens, scores[ORIGINAL].num_scored),
        "checkpoints": entries,
        "exit_code": code,
        "versions": _versions(),
        "seconds": time.time() - started,
    }
    return write_report(data, out, overwrite), code
