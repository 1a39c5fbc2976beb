"""``quantlab eval --compare``: several checkpoints of one original model side by side, sorted by size,
the Pareto front of size against perplexity marked."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quantlab.checkpoint.reader import load_quantized
from quantlab.errors import QuantlabError
from quantlab.fake_quant import decoded_weights
from quantlab.models import default_device

from .gates import Metrics, check_gates, task_recovery
from .inputs import (checkpoint_bytes, load_checkpoint_recipe, load_original, original_source, overrides,
                     read_provenance, refuse_calibration_text, versions)
from .perplexity import ORIGINAL, score, windows
from .progress import Progress
from .report import Report, check_output, write_report
from .run import EXIT_GATE_FAILED, EXIT_PASS, _data, _ppl, _settings, _window_batch
from .tasks import run_tasks, task_manager
from .text import load_eval_tokens


def run_compare(checkpoints: list[str], output: str | None = None, original: str | None = None,
                tasks: list[str] | None = None, limit: int | None = None, max_tokens: int | None = None,
                overwrite: bool = False, *, recipe_path: str | None = None, batch_size: int = 8,
                device: str | None = None, progress: bool = False) -> tuple[Report, int]:
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
    provs = [read_provenance(p) for p in paths]
    out = check_output(output if output is not None else paths[0].parent / "eval-compare", overwrite)
    changes = overrides(tasks, limit, max_tokens)
    recipes = [load_checkpoint_recipe(p, prov, recipe_path, changes)[0] for p, prov in zip(paths, provs)]
    sources = [original_source(p, prov, original) for p, prov in zip(paths, provs)]
    if len({s for _, s in sources}) > 1:
        raise QuantlabError("the checkpoints come from different original models (" + ", ".join(
            f"{p}: {s}" for p, (_, s) in zip(paths, sources)) + "); compare checkpoints of one model")
    ev = recipes[0].eval
    manager = task_manager(ev.tasks) if ev.tasks else None  # an unknown task fails here, before any work
    for r, prov in zip(recipes, provs):
        refuse_calibration_text(ev, r, prov)
    names = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    dev = torch.device(device) if device else default_device()
    window_batch = _window_batch(dev, batch_size)
    show = Progress(progress, 3 + (1 + len(paths)) * bool(ev.tasks))

    with show.phase(f"loading the original model {sources[0][0]} and {len(paths)} checkpoints on {dev.type}"):
        base_model, tokenizer = load_original(*sources[0])
        base_model.to(dev)
        models = {n: load_quantized(p, torch.float32, dev)[0] for n, p in zip(names, paths)}
        tokens = load_eval_tokens(ev.dataset, tokenizer, ev.max_tokens)
    num_windows = len(windows([len(d) for d in tokens.docs], ev.context_len, ev.stride))
    with show.phase(f"perplexity, KL and top-1 agreement of the original and {len(models)} checkpoints: "
                    f"{num_windows} windows of up to {ev.context_len} tokens, {tokens.num_tokens} tokens",
                    total=num_windows, unit="window") as advance, contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(decoded_weights(m))
        scores = score(base_model, models, tokens, ev.context_len, ev.stride, window_batch, on_windows=advance)
    what = f"lm-eval {', '.join(ev.tasks)}"
    base_tasks = {}
    if ev.tasks:
        with show.phase(f"{what} on the original model"):
            base_tasks = run_tasks(base_model, tokenizer, ev.tasks, ev.limit, ev.seed, batch_size, manager=manager,
                                   progress=progress)
    base = Metrics(scores[ORIGINAL].perplexity, tasks=base_tasks)

    entries = []
    for n, p, prov, r in zip(names, paths, provs, recipes):
        s = scores[n]
        qt = {}
        if ev.tasks:
            with show.phase(f"{what} on {n}"), decoded_weights(models[n]):
                qt = run_tasks(models[n], tokenizer, ev.tasks, ev.limit, ev.seed, batch_size, manager=manager,
                               progress=progress)
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
        "settings": _settings(ev, batch_size, window_batch),
        "data": _data(ev, tokens, scores[ORIGINAL].num_scored, num_windows),
        "checkpoints": entries,
        "exit_code": code,
        "versions": versions(),
    }
    with show.phase(f"writing the report to {out}"):
        data["seconds"] = time.time() - started
        report = write_report(data, out, overwrite)
    return report, code
