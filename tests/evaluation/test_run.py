"""run_eval / run_compare end to end on tiny checkpoints written by the real pipeline: exit codes, the
report's provenance, and one-sentence errors naming the path that was looked for."""

import json
import shutil

import pytest
import torch

from quantlab.errors import CheckpointError, QuantlabError, RecipeError
from quantlab.evaluation.text import load_eval_tokens
from quantlab.evaluation.compare import run_compare
from quantlab.evaluation.run import EXIT_GATE_FAILED, EXIT_PASS, run_eval
from quantlab.models import load_model


def test_passing_checkpoint_exits_0_with_a_complete_report(checkpoints, tmp_path):
    report, code = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"), progress=False)
    assert code == EXIT_PASS and report.data["passed"]
    files = {p.name: p.stat().st_size for p in (tmp_path / "r").iterdir()}
    assert set(files) == {"report.json", "report.md", "layer_error.png", "nll_diff.png", "kl_windows.png"}
    assert all(size > 1000 for size in files.values()), files
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [g["name"] for g in data["gates"]] == ["max_ppl_increase_pct", "max_kl", "min_top1_agreement"]
    assert data["settings"]["context_len"] == 64 and data["data"]["num_tokens"] == 384
    assert data["recipe"]["sha256"] == json.loads((checkpoints["int8"] / "quantlab.json").read_text())["recipe"]["sha256"]
    _, tokenizer = load_model(data["original"]["path"], torch.float32)
    assert data["data"]["token_sha256"] == load_eval_tokens("calib_data/heldout/mpl-2.0.txt", tokenizer, 384).digest
    assert 0 < data["kl"] < 1 and data["perplexity"]["quantized"]["perplexity"] > 1


def test_failed_gate_exits_3_and_the_report_says_which(checkpoints, tmp_path):
    report, code = run_eval(str(checkpoints["int4"]), output=str(tmp_path / "r"), progress=False)
    assert code == EXIT_GATE_FAILED
    failed = [g for g in report.data["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["max_kl"] and failed[0]["margin"] < 0
    assert "| max_kl | ≤ 0 |" in (tmp_path / "r" / "report.md").read_text()


def test_default_report_dir_is_inside_the_checkpoint_and_never_overwritten(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["int8"], tmp_path / "c")
    run_eval(str(ckpt), progress=False)
    assert (ckpt / "eval" / "report.json").exists()
    with pytest.raises(QuantlabError, match=f"{ckpt / 'eval'} exists"):
        run_eval(str(ckpt), progress=False)


def test_recipe_flag_replaces_the_embedded_gates(checkpoints, tmp_path):
    text = json.loads((checkpoints["int4"] / "quantlab.json").read_text())["recipe"]["text"]
    lax = tmp_path / "lax.yaml"
    lax.write_text(text.replace("max_kl: 0}", "max_kl: 5}"))
    report, code = run_eval(str(checkpoints["int4"]), output=str(tmp_path / "r"), recipe_path=str(lax), progress=False)
    assert code == EXIT_PASS and report.data["recipe"]["source"] == str(lax)


def test_missing_original_model_names_the_path_looked_for(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["int8"], tmp_path / "c")
    meta = json.loads((ckpt / "quantlab.json").read_text())
    meta["model"] = {"name": str(tmp_path / "gone"), "path": str(tmp_path / "gone")}
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"not found at {tmp_path / 'gone'}; pass --original"):
        run_eval(str(ckpt), progress=False)


def test_original_flag_points_at_the_model(checkpoints, tiny_original, tmp_path):
    ckpt = shutil.copytree(checkpoints["int8"], tmp_path / "c")
    meta = json.loads((ckpt / "quantlab.json").read_text())
    meta["model"] = {"name": "moved", "path": str(tmp_path / "gone")}
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    report, code = run_eval(str(ckpt), original=str(tiny_original), progress=False)
    assert code == EXIT_PASS and report.data["original"]["path"] == str(tiny_original)


def test_missing_embedded_recipe_names_quantlab_json(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["int8"], tmp_path / "c")
    meta = json.loads((ckpt / "quantlab.json").read_text())
    del meta["recipe"]
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    with pytest.raises(RecipeError, match=f"{ckpt / 'quantlab.json'}: recipe.text is missing.*pass --recipe"):
        run_eval(str(ckpt), progress=False)


def test_missing_checkpoint_and_missing_quantlab_json_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        run_eval(str(tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'plain' / 'quantlab.json'} not found"):
        run_eval(str(tmp_path / "plain"))


def test_evaluating_on_the_calibration_text_is_refused(checkpoints, tmp_path):
    text = json.loads((checkpoints["int8"] / "quantlab.json").read_text())["recipe"]["text"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("dataset: calib_data/heldout/mpl-2.0.txt", "dataset: calib_data/gpl-3.txt"))
    with pytest.raises(QuantlabError, match="is the calibration text"):
        run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"), recipe_path=str(bad), progress=False)


def test_compare_sorts_by_size_and_marks_the_pareto_front(checkpoints, tmp_path):
    report, code = run_compare([str(checkpoints["int8"]), str(checkpoints["int4"])], output=str(tmp_path / "cmp"),
                               progress=False)
    entries = report.data["checkpoints"]
    assert [e["name"] for e in entries] == ["tiny-int4", "tiny-int8"]  # int4 is smaller
    assert entries[0]["bytes"] < entries[1]["bytes"]
    assert entries[0]["pareto"]  # the smallest is always on the front
    assert entries[1]["pareto"] == (entries[1]["perplexity"] < entries[0]["perplexity"])
    assert code == EXIT_GATE_FAILED  # int4's own recipe has max_kl: 0
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"report.json", "report.md", "pareto.png"}
    assert "★" in (tmp_path / "cmp" / "report.md").read_text()
    assert "tiny-int4" in report.summary() and "(Pareto)" in report.summary()


def test_compare_refuses_checkpoints_of_different_models(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["int8"], tmp_path / "other")
    meta = json.loads((ckpt / "quantlab.json").read_text())
    meta["model"] = {"name": "smollm2-135m", "path": None}
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    with pytest.raises(QuantlabError, match="different original models"):
        run_compare([str(checkpoints["int8"]), str(ckpt)], output=str(tmp_path / "cmp"))


def test_cli_exit_codes_are_0_pass_3_gate_failed_2_user_error(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from quantlab.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["eval", str(checkpoints["int8"]), "--output", str(tmp_path / "a")])
    failed = runner.invoke(app, ["eval", str(checkpoints["int4"]), "--output", str(tmp_path / "b")])
    user_error = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert (ok.exit_code, failed.exit_code, user_error.exit_code) == (0, 3, 2)
    assert "FAIL" in failed.output


def test_task_scores_of_both_models_reach_the_report(checkpoints, tmp_path):
    tasks = ["quantlab_cloze", "quantlab_continuation"]
    report, _ = run_eval(str(checkpoints["int8"]), output=str(tmp_path / "r"), tasks=tasks, limit=2, progress=False)
    t = report.data["tasks"]
    assert set(t["original"]) == set(t["quantized"]) == set(t["recovery_pct"]) == set(tasks)
    assert t["primary"] == {"quantlab_cloze": "acc", "quantlab_continuation": "acc_norm"}
    assert report.data["settings"]["tasks"] == tasks and report.data["settings"]["limit"] == 2
    assert "## Tasks (lm-eval, zero-shot)" in (tmp_path / "r" / "report.md").read_text()
