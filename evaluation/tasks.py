"""lm-eval adapter: run lm-eval tasks on an in-memory model through ``lm_eval.simple_evaluate``.

quantlab's offline tasks (``quantlab_cloze``, ``quantlab_continuation``) are lm-eval task YAMLs in the
``tasks/`` directory beside this file, built from held-out text by ``tasks/build_tasks.py``. They are
registered with lm-eval through ``TaskManager(include_path=...)``; their data files are found relative
to the YAML directory by ``tasks/local_data.py`` (lm-eval would otherwise resolve ``data_files``
against the current directory), so they run from any working directory. Any other lm-eval task name
(hellaswag, arc_easy, mmlu ...) works too where its data can be downloaded or is in the HF cache;
indexing lm-eval's own ~15,000 task configs takes 10-20 s, so that is done only when one is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from quantlab.errors import QuantlabError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def offline_tasks() -> list[str]:
    """Names of quantlab's own lm-eval tasks (one YAML each in ``TASKS_DIR``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(tasks: Sequence[str]):
    """An lm-eval TaskManager that knows quantlab's tasks, and lm-eval's own only if one is asked for."""
    from lm_eval.tasks import TaskManager

    local = offline_tasks()
    # A quantlab_* name can only be ours: refuse a typo before indexing lm-eval's own tasks.
    unknown = [t for t in tasks if t.startswith("quantlab_") and t not in local]
    manager = None
    if not unknown:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=any(t not in local for t in tasks))
        unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise QuantlabError(f"lm-eval knows no task {', '.join(unknown)} (quantlab's offline tasks: {', '.join(local)})")
    return manager


def _numbers(task_results: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # alias, name, sample_len, "N/A" stderrs
        out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool):
    """Only lm-eval's errors, no bar while it builds requests, and nothing of lm-eval's on stdout.

    lm-eval warns on every run that an in-memory model ignores model kwargs and that custom_dataset
    takes --metadata (both expected here); it draws an unlabelled bar per task while building contexts
    (``lm_eval.api.task`` calls tqdm with no way to turn it off), which reads as if a model ran; and it
    prints "bootstrapping for stddev" to stdout, which belongs to quantlab's summary. Its prints go to
    stderr; without ``progress`` its prints and bars go nowhere.
    """
    import os
    from functools import partial

    import lm_eval.api.task as task_module

    lm_logger = logging.getLogger("lm_eval")
    level, bar = lm_logger.level, task_module.tqdm
    lm_logger.setLevel(logging.ERROR)
    task_module.tqdm = partial(bar, disable=True)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if progress else devnull), \
                contextlib.redirect_stderr(sys.stderr if progress else devnull):
            yield
    finally:
        lm_logger.setLevel(level)
        task_module.tqdm = bar


def _hflm(model: nn.Module, tokenizer, batch_size: int, progress: bool):
    """lm-eval's HF wrapper around an in-memory model; its request bars (with ETA) only when ``progress``."""
    from lm_eval.models.huggingface import HFLM

    class _LM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    *,
    manager=None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on lm-eval tasks, zero-shot.

    Args:
        model: a causal LM (float, or quantized through fake-quant modules), already on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names.
        limit: examples per task (lm-eval takes the first ``limit`` documents); None = all.
        seed: seeds lm-eval's python, numpy, torch and few-shot samplers.
        batch_size: requests per forward pass.
        manager: ``task_manager(tasks)`` when the caller already checked the names (saves re-indexing).
        progress: show lm-eval's per-request bar.

    Returns:
        task -> metric -> value, with ``<metric>_stderr`` beside each metric (e.g. ``{"acc": 0.6,
        "acc_stderr": 0.08, "acc_norm": ...}``). Only the names asked for are returned; a group
        (mmlu) is reported through lm-eval's own aggregate.

    Raises:
        QuantlabError: an unknown task name, or a task whose data cannot be loaded (no network).
    """
    if not tasks:
        return {}
    import lm_eval

    manager = manager or task_manager(tasks)
    with _quiet_lm_eval(progress):
        try:
            results = lm_eval.simple_evaluate(
                model=_hflm(model, tokenizer, batch_size, progress), tasks=list(tasks), limit=limit,
                task_manager=manager, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except (ConnectionError, OSError) as e:  # datasets' offline failures are OSError subclasses
            raise QuantlabError(f"lm-eval could not load the data of {', '.join(tasks)}: {str(e).splitlines()[0]}") from None
    return {task: _numbers(results["results"][task]) for task in tasks if task in results["results"]}
