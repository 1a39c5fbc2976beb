"""Promotion gates: a pure function from the original's metrics, a quantized model's metrics and the
recipe's ``Gates`` to one verdict per gate. No I/O, no model: the report and the exit code are built
from its output, and tests check it as a table.

Gates and how each value is computed (a gate set to None in the recipe is skipped):

===========================  ===============================================  ==========
gate                         value                                            passes if
===========================  ===============================================  ==========
``max_ppl_increase_pct``     100 * (ppl_quant / ppl_orig - 1)                 value <= t
``min_task_recovery_pct``    min over tasks of 100 * score_quant / score_orig value >= t
``max_kl``                   mean KL(P_orig || P_quant), nats per token       value <= t
``min_top1_agreement``       fraction of tokens with the same argmax          value >= t
===========================  ===============================================  ==========

``margin`` is signed so that positive always means "passed with room to spare": threshold - value for
the max gates, value - threshold for the min gates; a value at the threshold passes. A gate whose metric was not measured (e.g.
``min_task_recovery_pct`` with no tasks) fails: a checkpoint is not promoted on a number nobody took.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantlab.recipe.schema import Gates

# Which metric of a task decides recovery: the first of these the task reports. acc_norm first, as the
# lm-eval papers report it for multiple choice (hellaswag, arc); acc for cloze tasks and mmlu.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bleu")
_EPS = 1e-9


@dataclass(frozen=True)
class Metrics:
    """What one model scored.

    Attributes:
        perplexity: sliding-window perplexity on the held-out text, or None if not measured.
        kl: mean KL(P_orig || P_this) per token; None for the original itself.
        top1_agreement: fraction of tokens whose argmax equals the original's; None for the original.
        tasks: task -> metric -> value, as ``tasks.run_tasks`` returns (``*_stderr`` keys are ignored).
    """

    perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict.

    Attributes:
        name: the ``Gates`` field, e.g. ``max_kl``.
        threshold: the recipe's value.
        value: the measured value, or None if it could not be measured.
        passed: whether the gate holds.
        margin: positive = room to spare, negative = by how much it failed; None with ``value``.
        detail: what the value was computed from (e.g. the worst task), or why it is missing.
    """

    name: str
    threshold: float
    value: float | None
    passed: bool
    margin: float | None
    detail: str = ""


def primary_metric(task_metrics: dict[str, float]) -> str | None:
    """The metric of one task's results that recovery is computed on, or None if it has none."""
    return next((m for m in PRIMARY_METRICS if m in task_metrics), None)


def task_recovery(base: dict[str, dict[str, float]], quant: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per task: 100 * quantized / original primary score. A task where the original scores 0 counts as
    100% recovered when the quantized model scores 0 too (nothing was there to lose)."""
    out = {}
    for task, metrics in base.items():
        metric = primary_metric(metrics)
        if metric is None or metric not in quant.get(task, {}):
            continue
        b, q = metrics[metric], quant[task][metric]
        out[task] = 100.0 * q / b if b > 0 else (100.0 if q >= b else 0.0)
    return out


def _verdict(name: str, threshold: float, value: float | None, upper: bool, detail: str) -> GateResult:
    if value is None:
        return GateResult(name, threshold, None, False, None, detail)
    margin = threshold - value if upper else value - threshold
    # A value that equals the threshold up to float rounding of a ratio (10.5 / 10 - 1) counts as equal.
    return GateResult(name, threshold, value, margin >= -_EPS * max(1.0, abs(threshold)), margin, detail)


def check_gates(base: Metrics, quant: Metrics, gates: Gates) -> list[GateResult]:
    """The verdict of every gate that is set, in ``Gates`` field order."""
    results = []
    if gates.max_ppl_increase_pct is not None:
        if base.perplexity and quant.perplexity is not None:
            value, detail = 100.0 * (quant.perplexity / base.perplexity - 1.0), (
                f"perplexity {base.perplexity:.4g} -> {quant.perplexity:.4g}")
        else:
            value, detail = None, "perplexity was not measured"
        results.append(_verdict("max_ppl_increase_pct", gates.max_ppl_increase_pct, value, True, detail))
    if gates.min_task_recovery_pct is not None:
        recovery = task_recovery(base.tasks, quant.tasks)
        if recovery:
            worst = min(recovery, key=recovery.get)
            value, detail = recovery[worst], f"worst task {worst} ({primary_metric(base.tasks[worst])})"
        else:
            value, detail = None, "no task with an accuracy-type metric was run"
        results.append(_verdict("min_task_recovery_pct", gates.min_task_recovery_pct, value, False, detail))
    if gates.max_kl is not None:
        results.append(_verdict("max_kl", gates.max_kl, quant.kl, True,
                                "" if quant.kl is not None else "KL was not measured"))
    if gates.min_top1_agreement is not None:
        results.append(_verdict("min_top1_agreement", gates.min_top1_agreement, quant.top1_agreement, False,
                                "" if quant.top1_agreement is not None else "top-1 agreement was not measured"))
    return results
