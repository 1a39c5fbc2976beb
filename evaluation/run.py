"""``quantlab eval``: how much did a checkpoint lose against its original model, and may it be promoted?

``run_eval`` reads the checkpoint's quantlab.json for the original model and the recipe that made it,
takes the evaluation settings and gates from that recipe (or from ``--recipe``), checks the task names,
then measures both models over the same held-out windows (one loop) and lm-eval tasks, writes the report
(with the checkpoint's digest and the verdict, which ``quantlab build`` requires) and returns the exit
code: 0 all gates pass, 3 a gate failed (2 is a user error, raised as ``QuantlabError``).
"""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quantlab.checkpoint.digest import checkpoint_digest
from quantlab.checkpoint.reader import load_quantized
from quantlab.fake_quant import decoded_weights
from quantlab.models import default_device, resolve_model
from quantlab.recipe.schema import EvalConfig

from .gates import Metrics, check_gates, primary_metric, task_recovery
from .inputs import (checkpoint_bytes, load_checkpoint_recipe, load_original, original_source, overrides,
                     read_provenance, refuse_calibration_text, versions)
from .perplexity import ORIGINAL, ModelScores, score, spread, windows
from .progress import Progress
from .reference import StoredLogProbs, cache_root, entry_key, load_json, model_fingerprint, save_json
from .report import Report, check_output, write_report
from .tasks import run_tasks, task_manager
from .text import EvalTokens, dataset_files, load_eval_tokens

EXIT_PASS, EXIT_GATE_FAILED = 0, 3


def _settings(ev: EvalConfig, batch_size: int, window_batch: int) -> dict:
    return {"dataset": ev.dataset, "context_len": ev.context_len, "stride": ev.stride, "max_tokens": ev.max_tokens,
            "tasks": list(ev.tasks), "limit": ev.limit, "seed": ev.seed, "batch_size": batch_size,
            "window_batch": window_batch}


def _data(ev: EvalConfig, tokens: EvalTokens, num_scored: int, num_windows: int) -> dict:
    return {"files": [str(f) for f in dataset_files(ev.dataset)], "num_docs": len(tokens.docs),
            "num_tokens": tokens.num_tokens, "num_scored": num_scored, "num_windows": num_windows,
            "token_sha256": tokens.digest}


def _ppl(s: ModelScores) -> dict:
    """One model's perplexity record; the per-document spread only when there are several documents."""
    out = {"perplexity": s.perplexity, "nll": s.nll, "doc_perplexity": list(s.doc_perplexity)}
    if len(s.doc_perplexity) > 1:
        out["doc_spread"] = s.doc_spread()
    return out


def _documents(tokens: EvalTokens, base: ModelScores, quant: ModelScores) -> list[dict]:
    """Per-document rows (name, tokens, both perplexities), only when the text has several documents."""
    if len(tokens.docs) < 2:
        return []
    return [{"name": n, "tokens": len(d), ORIGINAL: b, "quantized": q, "change_pct": 100.0 * (q / b - 1.0)}
            for n, d, b, q in zip(tokens.names, tokens.docs, base.doc_perplexity, quant.doc_perplexity)]


def _nll_diff(base: ModelScores, quant: ModelScores) -> list[list[float | None]]:
    """Per document, quantized minus original NLL of each token (None where a token is not scored)."""
    return [[None if x != x else round(x, 5) for x in (q - b).tolist()] for b, q in zip(base.token_nll, quant.token_nll)]


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _window_batch(dev: torch.device, batch_size: int) -> int:
    """Windows per forward pass: ``batch_size`` on CUDA; one on the CPU, which is compute-bound either
    way, so the bar advances window by window and no padding is computed."""
    return batch_size if dev.type == "cuda" else 1


def _scores(show: Progress, base_model, quant_model, tokens: EvalTokens, ev: EvalConfig, window_batch: int,
            base_id: str | None, dev: torch.device) -> tuple[dict[str, ModelScores], bool]:
    """The perplexity phase: both models over the same windows in one loop, the original's log-probs
    read from the cache when an earlier evaluation stored them. Returns (scores, cache hit)."""
    wins = windows([len(d) for d in tokens.docs], ev.context_len, ev.stride)
    ref = None
    if base_id is not None:
        key = entry_key("logp", model=base_id, tokens=tokens.digest, context_len=ev.context_len, stride=ev.stride,
                        window_batch=window_batch, device=dev.type)
        ref = StoredLogProbs(cache_root() / f"{key}.safetensors", sum(w.num_scored for w in wins))
    who = ("quantized model; the original's log-probs from the cache" if ref is not None and ref.hit
           else "original and quantized model, window by window")
    text = (f"perplexity, KL and top-1 agreement ({who}): {len(wins)} windows of up to {ev.context_len} tokens, "
            f"stride {ev.stride}, {len(tokens.docs)} document{'s' if len(tokens.docs) > 1 else ''}, "
            f"{tokens.num_tokens} tokens")
    with show.phase(text, total=len(wins), unit="window") as advance, decoded_weights(quant_model):
        scores = score(base_model, {"quantized": quant_model}, tokens, ev.context_len, ev.stride, window_batch,
                       reference=ref, on_windows=advance)
    if ref is not None:
        ref.save()
    return scores, ref is not None and ref.hit


def _tasks(show: Progress, base_model, quant_model, tokenizer, ev: EvalConfig, manager, batch_size: int,
           base_id: str | None, dev: torch.device, progress: bool) -> tuple[dict, dict, bool]:
    """The lm-eval phases, quantized model first; the original's scores from the cache when stored.
    Returns (original's scores, quantized scores, cache hit)."""
    if not ev.tasks:
        return {}, {}, False
    what = f"lm-eval {', '.join(ev.tasks)} ({'all' if ev.limit is None else ev.limit} examples each, zero-shot)"
    args = (ev.tasks, ev.limit, ev.seed, batch_size)
    with show.phase(f"{what} on the quantized model"), decoded_weights(quant_model):
        quant_tasks = run_tasks(quant_model, tokenizer, *args, manager=manager, progress=progress)
    path = None
    if base_id is not None:
        key = entry_key("tasks", model=base_id, tasks=list(ev.tasks), limit=ev.limit, seed=ev.seed,
                        batch_size=batch_size, device=dev.type)
        path = cache_root() / f"{key}.json"
    cached = load_json(path) if path is not None else None
    with show.phase(f"{what} on the original model" + (" (from the cache)" if cached is not None else "")):
        base_tasks = cached if cached is not None else run_tasks(base_model, tokenizer, *args, manager=manager,
                                                                   progress=progress)
    if cached is None and path is not None:
        save_json(path, base_tasks)
    return base_tasks, quant_tasks, cached is not None


def run_eval(checkpoint: str, output: str | None = None, recipe_path: str | None = None, original: str | None = None,
             tasks: list[str] | None = None, limit: int | None = None, max_tokens: int | None = None,
             overwrite: bool = False, *, batch_size: int = 8, device: str | None = None,
             progress: bool = False, cache: bool = True, command: str | None = None) -> tuple[Report, int]:
    """Evaluate one checkpoint against its original model and write the report.

    Args:
        checkpoint: a quantlab checkpoint directory.
        output: report directory (default ``<checkpoint>/eval``); refused if it exists unless ``overwrite``.
        recipe_path: take eval settings and gates from this recipe instead of the embedded one.
        original: the original model (name or directory) instead of the one quantlab.json names.
        tasks, limit, max_tokens: override ``eval.tasks``, ``eval.limit``, ``eval.max_tokens``.
        batch_size: lm-eval requests per forward pass (and perplexity windows per pass on CUDA).
        device: ``cpu`` or ``cuda`` (default: CUDA when available). Both models are evaluated in float32.
        progress: print the phases and their bars on stderr (``progress.Progress``).
        cache: read and keep the original model's results under ``<quantlab cache>/eval``
            (``evaluation/reference.py``).
        command: the command line, recorded in the report.

    Returns:
        (report, exit code): 0 when every gate passes, 3 when one fails.
    """
    started = time.time()
    ckpt = Path(checkpoint)
    provenance = read_provenance(ckpt)
    out = check_output(output if output is not None else ckpt / "eval", overwrite)
    recipe, recipe_source = load_checkpoint_recipe(ckpt, provenance, recipe_path, overrides(tasks, limit, max_tokens))
    ev = recipe.eval
    manager = task_manager(ev.tasks) if ev.tasks else None  # an unknown task fails here, before any work
    refuse_calibration_text(ev, recipe, provenance)
    name, source = original_source(ckpt, provenance, original)
    dev = torch.device(device) if device else default_device()
    window_batch = _window_batch(dev, batch_size)
    show = Progress(progress, 3 + 2 * bool(ev.tasks))

    with show.phase(f"loading the original model {name} and the checkpoint {ckpt} on {dev.type}"):
        base_model, tokenizer = load_original(name, source)
        base_model.to(dev)
        quant_model, _, _ = load_quantized(ckpt, torch.float32, dev)
        digest = checkpoint_digest(ckpt)
        base_id = model_fingerprint(resolve_model(source)) if cache else None
        tokens = load_eval_tokens(ev.dataset, tokenizer, ev.max_tokens)
    scores, ppl_cached = _scores(show, base_model, quant_model, tokens, ev, window_batch, base_id, dev)
    base_tasks, quant_tasks, tasks_cached = _tasks(show, base_model, quant_model, tokenizer, ev, manager, batch_size,
                                                   base_id, dev, progress)

    base, q = scores[ORIGINAL], scores["quantized"]
    verdicts = check_gates(Metrics(base.perplexity, tasks=base_tasks),
                           Metrics(q.perplexity, q.kl, q.top1_agreement, quant_tasks), ev.gates)
    passed = all(g.passed for g in verdicts)
    code = EXIT_PASS if passed else EXIT_GATE_FAILED
    recipe_record = provenance.get("recipe") or {}
    data = {
        "kind": "eval",
        "checkpoint_digest": digest,
        "passed": passed,
        "exit_code": code,
        "checkpoint": {"path": str(ckpt), "bytes": checkpoint_bytes(ckpt), "digest": digest},
        "original": {"name": name, "path": source},
        "recipe": {"source": recipe_source, "path": recipe_record.get("path"),
                   "sha256": recipe.sha256 if recipe_path else recipe_record.get("sha256", recipe.sha256)},
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_label(dev),
        "settings": _settings(ev, batch_size, window_batch),
        "data": _data(ev, tokens, q.num_scored, len(q.window_kl)),
        "perplexity": {ORIGINAL: _ppl(base), "quantized": _ppl(q)},
        "documents": _documents(tokens, base, q),
        "kl": q.kl,
        "kl_windows": spread(q.window_kl),
        "top1_agreement": q.top1_agreement,
        "top1_windows": spread(q.window_top1),
        "tasks": {ORIGINAL: base_tasks, "quantized": quant_tasks, "recovery_pct": task_recovery(base_tasks, quant_tasks),
                  "primary": {t: primary_metric(m) for t, m in base_tasks.items()}},
        "gates": [asdict(g) for g in verdicts],
        "layers": provenance.get("layers") or [],
        "calibration": provenance.get("calibration"),
        "cache": {"original_log_probs": ppl_cached, "original_tasks": tasks_cached},
        "versions": versions(),
        "per_window": {"kl": list(q.window_kl), "top1_agreement": list(q.window_top1)},
        "token_nll_diff": _nll_diff(base, q),
    }
    with show.phase(f"writing the report to {out}"):
        data["phases"] = [{"phase": t, "seconds": round(s, 2)} for t, s in show.timings]
        data["seconds"] = time.time() - started
        report = write_report(data, out, overwrite)
    return report, code
