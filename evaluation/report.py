"""Write an evaluation report directory: report.json (every number and the provenance needed to
reproduce it), report.md (for people, ``markdown.py``) and PNG plots (``plots.py``); read its verdict back.

Nothing half-written: all files go into a temporary directory beside the output, which is renamed into
place once complete. An existing report directory is refused unless ``overwrite`` is set, and then it
is replaced only after the new one is complete.

``report.json`` of ``quantlab eval`` (kind ``eval``) holds: ``checkpoint_digest`` (``quantlab.checkpoint
.digest.checkpoint_digest`` of the checkpoint evaluated) and ``passed`` (the gate verdict) at the top,
which is what ``quantlab build`` checks (``read_verdict``); ``exit_code``; ``checkpoint`` (path, bytes,
digest), ``original`` (name, path), ``recipe`` (where the settings came from, sha256), ``command``,
``date`` (UTC), ``device``; ``settings`` (dataset, windows, tasks, limit, seed, batch sizes); ``data``
(files, documents, tokens, scored tokens, windows, ``token_sha256`` of the evaluation token ids);
``perplexity`` (per model: perplexity, mean NLL, per-document perplexities, and their ``doc_spread``
only when there are several documents); ``documents`` (per-document rows of both models, empty for one
document); ``kl`` and ``top1_agreement`` with ``kl_windows`` / ``top1_windows`` (min, median, max,
std over windows) and ``per_window`` (the values per window, in text order); ``token_nll_diff`` (per
document, quantized minus original NLL of each token, null where not scored); ``tasks`` (per model:
metric values and stderrs; recovery %; primary metric); ``gates`` (name, threshold, value, passed,
margin, detail); ``layers`` (per-layer calibration error from quantlab.json); ``cache`` (whether the
original's results came from the cache); ``versions``; ``phases`` (seconds per phase); ``seconds``;
``plots`` (which figures were drawn). Kind ``compare`` holds the shared ``original``, ``settings`` and
``data``, and one entry per checkpoint under ``checkpoints`` (sorted by size, with ``pareto``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantlab import atomic
from quantlab.errors import QuantlabError

from .markdown import render_compare_md, render_eval_md
from .plots import plot_kl_windows, plot_layer_errors, plot_nll_diff, plot_pareto


@dataclass(frozen=True)
class Report:
    """A written (or, with ``path`` None, unwritten) report: ``data`` is report.json's content."""

    data: dict
    path: Path | None

    def summary(self) -> str:
        """The closing summary for the terminal: a table of both models' numbers, the gates with limit,
        value and margin, the verdict, and where the report is."""
        d = self.data
        lines = _eval_summary(d) if d["kind"] == "eval" else _compare_summary(d)
        if self.path is not None:
            lines.append(f"report: {self.path / 'report.md'}")
        return "\n".join(lines)


def _rows(rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _eval_summary(d: dict) -> list[str]:
    ppl = d["perplexity"]
    b, q = ppl["original"]["perplexity"], ppl["quantized"]["perplexity"]
    rows = [["", "original", "quantized", "change"],
            ["perplexity", f"{b:.4g}", f"{q:.4g}", f"{100 * (q / b - 1):+.2f} %"],
            ["KL (nats/token)", "0", f"{d['kl']:.4g}", ""],
            ["top-1 agreement", "1", f"{d['top1_agreement']:.4f}", ""]]
    t = d["tasks"]
    for task, metric in t["primary"].items():
        if metric is not None and metric in t["quantized"].get(task, {}):
            rec = t["recovery_pct"].get(task)
            rows.append([f"{task} {metric}", f"{t['original'][task][metric]:.4g}", f"{t['quantized'][task][metric]:.4g}",
                         "" if rec is None else f"{rec:.1f} % kept"])
    lines = _rows(rows)
    if d["gates"]:
        lines += [""] + _rows([["gate", "limit", "value", "margin", ""]] + [
            [g["name"], f"{'<=' if g['name'].startswith('max_') else '>='} {g['threshold']:g}",
             "not measured" if g["value"] is None else f"{g['value']:.4g}",
             "" if g["margin"] is None else f"{g['margin']:+.4g}", "pass" if g["passed"] else "FAIL"]
            for g in d["gates"]])
        lines.append("PASS: all gates pass" if d["passed"] else "FAIL: a gate failed")
    else:
        lines.append("PASS: no gates are set")
    return lines


def _compare_summary(d: dict) -> list[str]:
    return [f"{c['name']}: {c['bytes'] / 2**20:.1f} MiB, perplexity {c['perplexity']:.4g}, "
            f"KL {c['kl']:.4g}{'  (Pareto)' if c['pareto'] else ''}{'' if c['passed'] else '  FAILS its gates'}"
            for c in d["checkpoints"]]


def read_verdict(report_path: str | Path) -> tuple[str, bool]:
    """(checkpoint digest, passed) of a ``quantlab eval`` report.json, for a promotion check: the
    digest says which checkpoint bytes were evaluated, ``passed`` whether every gate held.

    Raises:
        QuantlabError: the file is missing, not JSON, or lacks either field (one sentence naming it).
    """
    path = Path(report_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantlabError(f"evaluation report {path} not found; run quantlab eval on the checkpoint") from None
    except (OSError, ValueError) as e:
        raise QuantlabError(f"evaluation report {path} cannot be read as JSON ({e})") from None
    digest = data.get("checkpoint_digest") if isinstance(data, dict) else None
    passed = data.get("passed") if isinstance(data, dict) else None
    if not isinstance(digest, str) or not isinstance(passed, bool):
        raise QuantlabError(f"evaluation report {path} records no checkpoint_digest and passed verdict "
                            "(written by an older quantlab eval); evaluate the checkpoint again")
    return digest, passed


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The report directory, refused when it exists and ``overwrite`` is off (checked before evaluating)."""
    return atomic.check_output(output, overwrite, what="report directory ")


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
            data["plots"] = {
                "nll_diff": plot_nll_diff(data["token_nll_diff"], tmp / "nll_diff.png"),
                "kl_windows": plot_kl_windows(data["per_window"]["kl"], data["kl"], tmp / "kl_windows.png"),
                "layer_error": plot_layer_errors(data.get("layers") or [], tmp / "layer_error.png"),
            }
            markdown = render_eval_md(data)
        else:
            c = data["checkpoints"]
            plot_pareto([x["name"] for x in c], [x["bytes"] for x in c], [x["perplexity"] for x in c],
                        "perplexity (held-out)", data["original"]["perplexity"], tmp / "pareto.png")
            markdown = render_compare_md(data)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        (tmp / "report.md").write_text(markdown)
    return Report(data, out)
