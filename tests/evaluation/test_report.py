"""Report directories are written atomically, refused when they exist, and replaced only when asked."""

import json

import pytest

from quantlab.errors import QuantlabError
from quantlab.evaluation.plots import pareto_front
from quantlab.evaluation.report import write_report


def eval_data(**changes) -> dict:
    """A minimal, complete report.json of kind ``eval`` (three documents)."""
    spread = {"min": 9.0, "median": 10.0, "max": 11.0, "std": 1.0}
    data = {
        "kind": "eval",
        "checkpoint_digest": "ef" * 32,
        "passed": False,
        "exit_code": 3,
        "checkpoint": {"path": "ckpt", "bytes": 1234, "digest": "ef" * 32},
        "original": {"name": "tiny", "path": "/models/tiny"},
        "recipe": {"source": "r.yaml", "path": "r.yaml", "sha256": "ab" * 32},
        "command": "quantlab eval ckpt",
        "date": "2026-12-02T07:00:00+00:00",
        "device": "cpu (x86_64, 2 threads)",
        "settings": {"dataset": "calib_data/heldout", "context_len": 64, "stride": 32, "max_tokens": 256,
                     "tasks": ["quantlab_cloze"], "limit": 10, "seed": 1, "batch_size": 4, "window_batch": 1},
        "data": {"files": ["a.txt"], "num_docs": 3, "num_tokens": 256, "num_scored": 253, "num_windows": 9,
                 "token_sha256": "cd" * 32},
        "perplexity": {"original": {"perplexity": 10.0, "nll": 2.3, "doc_perplexity": [9.0, 10.0, 11.0],
                                    "doc_spread": spread},
                       "quantized": {"perplexity": 10.4, "nll": 2.34, "doc_perplexity": [9.0, 10.0, 11.0],
                                     "doc_spread": spread}},
        "documents": [{"name": f"d{i}", "tokens": 80 + i, "original": 10.0, "quantized": 10.4, "change_pct": 4.0}
                      for i in range(3)],
        "kl": 0.02,
        "kl_windows": spread,
        "top1_agreement": 0.93,
        "top1_windows": spread,
        "tasks": {"original": {"quantlab_cloze": {"acc": 0.5, "acc_stderr": 0.1, "perplexity": 8.0}},
                  "quantized": {"quantlab_cloze": {"acc": 0.4, "acc_stderr": 0.1, "perplexity": 9.0}},
                  "recovery_pct": {"quantlab_cloze": 80.0}, "primary": {"quantlab_cloze": "acc"}},
        "gates": [{"name": "min_task_recovery_pct", "threshold": 90.0, "value": 80.0, "passed": False,
                   "margin": -10.0, "detail": "worst task quantlab_cloze (acc)"}],
        "layers": [{"name": f"model.layers.{i}", "rel_mse": 1e-3 * (i + 1)} for i in range(4)],
        "cache": {"original_log_probs": False, "original_tasks": True},
        "versions": {"quantlab": "0.1.0"},
        "per_window": {"kl": [0.01 * (i % 4) for i in range(9)], "top1_agreement": [0.9] * 9},
        "token_nll_diff": [[None] + [0.01 * (j % 7) - 0.02 for j in range(79 + i)] for i in range(3)],
        "phases": [{"phase": "loading", "seconds": 1.0}],
        "seconds": 1.0,
    }
    data.update(changes)
    return data


PLOTS = ["kl_windows.png", "layer_error.png", "nll_diff.png"]


def test_report_holds_json_markdown_and_layer_plot(tmp_path):
    report = write_report(eval_data(), tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(PLOTS + ["report.json", "report.md"])
    assert all((tmp_path / "r" / p).stat().st_size > 1000 for p in PLOTS)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["top1_agreement"] == 0.93
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**FAIL**" in md and "-10" in md and "quantlab_cloze" in md and "80" in md
    assert "FAIL: a gate failed" in report.summary()
    for p in PLOTS:
        assert f"]({p})" in md  # embedded by relative path
    assert "### Per document" in md and "`d2`" in md


def test_missing_layer_stats_degrade_to_a_sentence(tmp_path):
    write_report(eval_data(layers=[]), tmp_path / "r")
    assert not (tmp_path / "r" / "layer_error.png").exists()
    assert "no per-layer statistics" in (tmp_path / "r" / "report.md").read_text()


def test_existing_report_dir_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    with pytest.raises(QuantlabError, match="exists; pass --overwrite"):
        write_report(eval_data(), tmp_path / "r")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stale.txt").write_text("old")
    write_report(eval_data(), tmp_path / "r", overwrite=True)
    assert not (tmp_path / "r" / "stale.txt").exists() and (tmp_path / "r" / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temp or old dirs left behind


def test_a_failed_write_leaves_nothing_at_the_output(tmp_path):
    with pytest.raises(TypeError):
        write_report(eval_data(seconds=object()), tmp_path / "r")  # not JSON-serializable
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_report(tmp_path):
    write_report(eval_data(), tmp_path / "r")
    before = (tmp_path / "r" / "report.json").read_text()
    with pytest.raises(TypeError):
        write_report(eval_data(seconds=object()), tmp_path / "r", overwrite=True)
    assert (tmp_path / "r" / "report.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize(
    "points, front",
    [
        ([(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)], [True, True, False, True]),
        ([(1, 5.0), (1, 6.0)], [True, False]),          # same size, worse loss
        ([(2, 5.0), (2, 5.0)], [True, True]),           # ties dominate neither
        ([(1, 9.0)], [True]),
    ],
)
def test_pareto_front_keeps_undominated_points(points, front):
    assert pareto_front(points) == front
