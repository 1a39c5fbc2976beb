"""Write an evaluation report directory: report.json (every number and the provenance needed to
reproduce it), report.md (for people) and PNG plots.

Nothing half-written: all files go into a temporary directory beside the output, which is renamed into
place once complete. An existing report directory is refused unless ``overwrite`` is set, and then it
is replaced only after the new one is complete.

``report.json`` of ``quantlab eval`` (kind ``eval``) holds: ``checkpoint`` (path, bytes), ``original``
(name, path), ``recipe`` (where the settings came from, sha256), ``settings`` (dataset, windows, tasks,
limit, seed), ``data`` (files, documents, tokens, ``token_sha256`` of the evaluation token ids),
``perplexity`` (per model: perplexity, per-document spread), ``kl``, ``top1_agreement``, ``tasks``
(per model: metric values and stderrs; recovery %), ``gates`` (one verdict each), ``passed``,
``exit_code``, ``layers`` (per-layer error from quantlab.json), ``versions`` and ``seconds``.
Kind ``compare`` holds the shared ``original``, ``settings`` and ``data``, and one entry per checkpoint
under ``checkpoints`` (sorted by size, with ``pareto``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantlab import atomic

from .plots import plot_layer_errors, plot_pareto


@dataclass(frozen=True)
class Report:
    """A written (or, with ``path`` None, unwritten) report: ``data`` is report.json's content."""

    data: dict
    path: Path | None

    def summary(self) -> str:
        """A few lines for the terminal: the verdict, the main numbers and where the report is."""
        d = self.data
        lines = []
        if d["kind"] == "eval":
            ppl = d["perplexity"]
            lines.append(f"perplexity {ppl['original']['perplexity']:.4g} -> {ppl['quantized']['perplexity']:.4g}, "
                         f"KL {d['kl']:.4g}, top-1 agreement {d['top1_agreement']:.4f}")
            lines += [_gate_line(g) for g in d["gates"]]
            if not d["gates"]:
                lines.append("PASS: no gates are set")
            else:
                lines.append("PASS: all gates pass" if d["passed"] else "FAIL: a gate failed")
        else:
            for c in d["checkpoints"]:
                lines.append(f"{c['name']}: {c['bytes'] / 2**20:.1f} MiB, perplexity {c['perplexity']:.4g}, "
                             f"KL {c['kl']:.4g}{'  (Pareto)' if c['pareto'] else ''}"
                             f"{'' if c['passed'] else '  FAILS its gates'}")
        if self.path is not None:
            lines.append(f"report: {self.path / 'report.md'}")
        return "\n".join(lines)


def _gate_line(g: dict) -> str:
    value = "not measured" if g["value"] is None else f"{g['value']:.4g}"
    margin = "" if g["margin"] is None else f" (margin {g['margin']:+.4g})"
    return f"{'pass' if g['passed'] else 'FAIL'}  {g['name']} {g['threshold']:g}: {value}{margin}"


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The report directory, refused when it exists and ``overwrite`` is off (checked before evaluating)."""
    return atomic.check_output(output, overwrite, what="report directory ")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _gates_md(gates: list[dict]) -> list[str]:
    if not gates:
        return ["No gates are set in the recipe, so nothing blocks promotion."]
    rows = [[g["name"], f"{g['threshold']:g}", _fmt(g["value"]), "—" if g["margin"] is None else f"{g['margin']:+.4g}",
             "pass" if g["passed"] else "**FAIL**", g.get("detail", "")] for g in gates]
    return _table(["gate", "threshold", "value", "margin", "result", "detail"], rows)


def _tasks_md(tasks: dict) -> list[str]:
    rows = []
    for task, base in tasks["original"].items():
        for metric, value in base.items():
            if metric.endswith("_stderr"):
                continue
            q = tasks["quantized"].get(task, {})
            rec = tasks["recovery_pct"].get(task) if metric == tasks["primary"].get(task) else None
            rows.append([task, metric + (" (primary)" if rec is not None else ""),
                         f"{_fmt(value)} ± {_fmt(base.get(metric + '_stderr'), 2)}",
                         f"{_fmt(q.get(metric))} ± {_fmt(q.get(metric + '_stderr'), 2)}", _fmt(rec)])
    return _table(["task", "metric", "original", "quantized", "recovery %"], rows)


def render_eval_md(d: dict) -> str:
    """report.md of one checkpoint."""
    ppl, s = d["perplexity"], d["settings"]
    verdict = "PASS" if d["passed"] else "FAIL"
    out = [f"# Evaluation of `{d['checkpoint']['path']}`", "",
           f"**{verdict}** (exit code {d['exit_code']}) against `{d['original']['name']}`; "
           f"settings from {d['recipe']['source']} (recipe sha256 `{d['recipe']['sha256'][:12]}`).", "",
           "## Gates", "", *_gates_md(d["gates"]), "",
           "## Held-out perplexity", "",
           f"`{s['dataset']}`: documents {d['data']['num_docs']}, scored tokens {d['data']['num_scored']}, windows of "
           f"{s['context_len']} tokens every {s['stride']} (token sha256 `{d['data']['token_sha256'][:16]}`).", ""]
    rows = [[name, _fmt(m["perplexity"], 5), _fmt(m["doc_spread"]["min"]), _fmt(m["doc_spread"]["median"]),
             _fmt(m["doc_spread"]["max"]), _fmt(m["doc_spread"]["std"])] for name, m in ppl.items()]
    out += _table(["model", "perplexity", "doc min", "doc median", "doc max", "doc std"], rows)
    out += ["", f"Mean KL(P_original ‖ P_quantized): **{d['kl']:.4g}** nats/token; top-1 agreement: "
            f"**{d['top1_agreement']:.4f}**.", ""]
    if d["tasks"]["original"]:
        out += ["## Tasks (lm-eval, zero-shot)", "",
                f"limit {s['limit'] if s['limit'] is not None else 'none'} per task, seed {s['seed']}.", "",
                *_tasks_md(d["tasks"]), ""]
    out += ["## Per-layer quantization error", ""]
    out += (["![per-layer error](layer_error.png)", ""] if d.get("layer_plot") else
            ["quantlab.json holds no per-layer statistics.", ""])
    out += ["## Provenance", "", *_table(["item", "value"], [
        ["checkpoint bytes (safetensors)", str(d["checkpoint"]["bytes"])],
        ["original path", f"`{d['original']['path']}`"],
        ["recipe", f"`{d['recipe']['path']}`"],
        *[[f"{k} version", str(v)] for k, v in d["versions"].items()],
        ["seconds", f"{d['seconds']:.1f}"]]), ""]
    return "\n".join(out)


def render_compare_md(d: dict) -> str:
    """report.md of several checkpoints against one original."""
    s = d["settings"]
    out = [f"# Comparison against `{d['original']['name']}`", "",
           f"`{s['dataset']}`: {d['data']['num_scored']} scored tokens (token sha256 `{d['data']['token_sha256'][:16]}`); "
           f"original perplexity {d['original']['perplexity']:.5g}. Sorted by size; ★ = on the Pareto front of "
           "size vs perplexity (no other checkpoint is both smaller and better).", ""]
    tasks = sorted({t for c in d["checkpoints"] for t in c["task_recovery_pct"]})
    rows = [[("★ " if c["pareto"] else "") + f"`{c['name']}`", f"{c['bytes'] / 2**20:.1f}", _fmt(c["perplexity"], 5),
             _fmt(c["kl"]), f"{c['top1_agreement']:.4f}", *[_fmt(c["task_recovery_pct"].get(t)) for t in tasks],
             "pass" if c["passed"] else "**FAIL**"] for c in d["checkpoints"]]
    out += _table(["checkpoint", "MiB", "perplexity", "KL", "top-1", *[f"{t} recovery %" for t in tasks], "gates"], rows)
    out += ["", "![size vs perplexity](pareto.png)", ""]
    for c in d["checkpoints"]:
        out += [f"## `{c['name']}`", "", f"path `{c['path']}`, recipe sha256 `{c['recipe_sha256'][:12]}`", "",
                *_gates_md(c["gates"]), ""]
    return "\n".join(out)


def write_report(data: dict, output: str | Path, overwrite: bool = False) -> Report:
    """Write report.json, report.md and the plots into ``output``, atomically.

    Args:
        data: report.json's content (see the module docstring); ``kind`` is ``eval`` or ``compare``.
        output: the report directory to create.
        overwrite: replace an existing directory (only once the new one is complete).
    """
    out = check_output(output, overwrite)
    with atomic.atomic_directory(out, overwrite, what="report directory ") as tmp:
        data = dict(data)
        if data["kind"] == "eval":
            data["layer_plot"] = plot_layer_errors(data.get("layers") or [], tmp / "layer_error.png")
            markdown = render_eval_md(data)
        else:
            c = data["checkpoints"]
            plot_pareto([x["name"] for x in c], [x["bytes"] for x in c], [x["perplexity"] for x in c],
                        "perplexity (held-out)", data["original"]["perplexity"], tmp / "pareto.png")
            markdown = render_compare_md(data)
        (tmp / "report.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        (tmp / "report.md").write_text(markdown)
    return Report(data, out)
