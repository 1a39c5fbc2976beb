"""What ``quantlab eval`` tells a person and a program: report content (per-document rows only when the
text has several documents, every gate, non-empty plots, the checkpoint's digest and verdict), the
closing summary alone under ``--quiet``, and an unknown task refused before any model is loaded."""

import json
import shutil

import pytest

from quantlab.checkpoint.digest import checkpoint_digest
from quantlab.errors import QuantlabError
from quantlab.evaluation.progress import wanted
from quantlab.evaluation.report import read_verdict
from quantlab.evaluation.run import run_eval

UNKNOWN_TASK = "lm-eval knows no task quantlab_nope (quantlab's offline tasks: quantlab_cloze, quantlab_continuation)"


def _with_dataset(checkpoint, tmp_path, dataset: str):
    """A copy of ``checkpoint`` whose embedded recipe evaluates on ``dataset``."""
    ckpt = shutil.copytree(checkpoint, tmp_path / "c")
    meta = json.loads((ckpt / "quantlab.json").read_text())
    meta["recipe"]["text"] = meta["recipe"]["text"].replace("calib_data/heldout/mpl-2.0.txt", dataset)
    meta["recipe"]["path"] = str(tmp_path / "gone.yaml")  # parse the embedded text, not the original file
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    return ckpt


def test_several_documents_get_per_document_rows_and_a_spread(checkpoints, tmp_path):
    ckpt = _with_dataset(checkpoints["int8"], tmp_path, "calib_data/heldout/stdlib_docstrings.jsonl")
    report, _ = run_eval(str(ckpt))
    d = report.data
    assert d["data"]["num_docs"] > 1 and len(d["documents"]) == d["data"]["num_docs"]
    assert [r["tokens"] for r in d["documents"]] == [len(x) for x in d["token_nll_diff"]]
    assert sum(r["tokens"] for r in d["documents"]) == d["data"]["num_tokens"]
    for model in ("original", "quantized"):
        s = d["perplexity"][model]["doc_spread"]
        assert s["min"] < s["max"] and s["std"] > 0
    md = (ckpt / "eval" / "report.md").read_text()
    assert "### Per document" in md and f"`{d['documents'][1]['name']}`" in md


def test_one_document_gets_no_per_document_rows_nor_spread(checkpoints, tmp_path):
    report, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"))
    d = report.data
    assert d["data"]["num_docs"] == 1 and d["documents"] == []
    assert "doc_spread" not in d["perplexity"]["original"] and "doc_spread" not in d["perplexity"]["quantized"]
    assert "Per document" not in (tmp_path / "r" / "report.md").read_text()


def test_every_gate_is_listed_with_limit_value_and_margin(checkpoints, tmp_path):
    report, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"))
    md = (tmp_path / "r" / "report.md").read_text()
    summary = report.summary()
    names = ["max_ppl_increase_pct", "max_kl", "min_top1_agreement"]
    assert [g["name"] for g in report.data["gates"]] == names
    for g in report.data["gates"]:
        assert f"| {g['name']} | {'≤' if g['name'].startswith('max') else '≥'} {g['threshold']:g} | {g['value']:.4g} | " \
               f"{g['margin']:+.4g} | pass |" in md
        assert g["name"] in summary and f"{g['margin']:+.4g}" in summary


def test_report_records_the_checkpoint_digest_and_verdict_for_the_builder(checkpoints, tmp_path):
    for name, passed in (("int8", True), ("int4", False)):
        run_eval(str(checkpoints[name]), output=str(tmp_path / name))
        assert read_verdict(tmp_path / name / "report.json") == (checkpoint_digest(checkpoints[name]), passed)


def test_read_verdict_refuses_a_report_without_digest_in_one_sentence(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"passed": True}))
    with pytest.raises(QuantlabError, match="records no checkpoint_digest"):
        read_verdict(tmp_path / "report.json")
    with pytest.raises(QuantlabError, match="not found; run quantlab eval"):
        read_verdict(tmp_path / "missing.json")


def test_a_second_checkpoint_reuses_the_originals_results_with_the_same_numbers(checkpoints, tmp_path):
    first, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "a"))
    again, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "b"))
    assert first.data["cache"]["original_log_probs"] is False and again.data["cache"]["original_log_probs"] is True
    for key in ("perplexity", "kl", "top1_agreement", "per_window", "gates"):
        assert again.data[key] == first.data[key], key
    fresh, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "c"), cache=False)
    assert fresh.data["cache"]["original_log_probs"] is False and fresh.data["perplexity"] == first.data["perplexity"]


def test_unknown_task_fails_before_any_model_is_loaded(checkpoints, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr("quantlab.evaluation.run.load_original", no_work)
    monkeypatch.setattr("quantlab.evaluation.run.load_quantized", no_work)
    with pytest.raises(QuantlabError) as e:
        run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"), tasks=["quantlab_cloze", "quantlab_nope"])
    assert str(e.value) == UNKNOWN_TASK
    assert not (tmp_path / "r").exists()


def test_cli_unknown_task_is_one_line_and_exit_2(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from quantlab.cli import app

    result = CliRunner().invoke(app, ["eval", str(checkpoints["int8"]), "--output", str(tmp_path / "r"),
                                      "--tasks", "quantlab_nope"])
    assert result.exit_code == 2
    assert result.output == f"error: {UNKNOWN_TASK}\n"


def _terminal(monkeypatch):
    """Let the CLI believe stdout is a terminal (CliRunner's is not)."""
    monkeypatch.setattr("quantlab.evaluation.progress.wanted", lambda quiet, stream=None: not quiet)


def test_quiet_prints_only_the_summary(checkpoints, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantlab.cli import app

    _terminal(monkeypatch)
    # With a task: lm-eval prints "bootstrapping for stddev" and draws bars of its own unless silenced.
    result = CliRunner().invoke(app, ["eval", str(checkpoints["int8"]), "--output", str(tmp_path / "r"), "--quiet",
                                      "--tasks", "quantlab_cloze", "--limit", "2"])
    assert result.exit_code == 0, result.output
    summary = result.output.splitlines()
    assert summary[0].split() == ["original", "quantized", "change"]
    assert summary[4].startswith("quantlab_cloze acc")
    assert summary[-2:] == ["PASS: all gates pass", f"report: {tmp_path / 'r' / 'report.md'}"]
    assert not any(line.startswith("[") or "bootstrapping" in line or "%|" in line for line in summary)


def test_a_terminal_sees_each_phase_announced_and_timed(checkpoints, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantlab.cli import app

    _terminal(monkeypatch)
    result = CliRunner().invoke(app, ["eval", str(checkpoints["int8"]), "--output", str(tmp_path / "r")])
    assert result.exit_code == 0
    phases = [line for line in result.output.splitlines() if line.startswith("[")]
    assert [p[:5] for p in phases] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "windows of up to 64 tokens" in phases[1] and "original and quantized model" in phases[1]
    assert result.output.count("done in") == 3


def test_progress_is_off_when_quiet_or_stdout_is_not_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert wanted(False, Stream(True)) and not wanted(True, Stream(True)) and not wanted(False, Stream(False))
