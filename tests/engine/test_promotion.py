"""A quantized checkpoint becomes an engine only with a passing evaluation report of its exact bytes;
``--skip-gates`` overrides that and is recorded in engine.json."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_helpers import build
from typer.testing import CliRunner

from quantlab.checkpoint.digest import checkpoint_digest
from quantlab.cli import app
from quantlab.engine.promotion import PromotionError
from quantlab.recipe.schema import SchemeGroup, WeightScheme

INT4 = [SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))]


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(INT4), path)
    return path


def _report(ckpt, **fields) -> None:
    (ckpt / "eval").mkdir(exist_ok=True)
    (ckpt / "eval" / "report.json").write_text(json.dumps(fields))


def test_no_report_is_refused_with_exit_3(ckpt, tmp_path):
    with pytest.raises(PromotionError, match="has no evaluation report") as e:
        build(ckpt, tmp_path / "eng", skip_gates=False)
    assert e.value.exit_code == 3 and not (tmp_path / "eng").exists()
    result = CliRunner().invoke(app, ["build", str(ckpt), "--output", str(tmp_path / "eng"), "--device", "cpu"])
    assert result.exit_code == 3 and result.output.count("\n") == 1 and "error:" in result.output


@pytest.mark.parametrize("fields, message", [
    ({"passed": True}, "records no checkpoint_digest"),
    ({"passed": True, "checkpoint_digest": "0" * 64}, "evaluated other checkpoint bytes"),
    ({"passed": False, "checkpoint_digest": None}, "failed its evaluation gates"),
])
def test_report_of_other_bytes_or_failed_gates_is_refused(ckpt, tmp_path, fields, message):
    if "checkpoint_digest" in fields and fields["checkpoint_digest"] is None:
        fields["checkpoint_digest"] = checkpoint_digest(ckpt)
    _report(ckpt, **fields)
    with pytest.raises(PromotionError, match=message):
        build(ckpt, tmp_path / "eng", skip_gates=False)


def test_changed_checkpoint_after_eval_is_refused(ckpt, tmp_path):
    _report(ckpt, passed=True, checkpoint_digest=checkpoint_digest(ckpt))
    config = json.loads((ckpt / "quantlab.json").read_text())
    config["note"] = "edited after evaluation"
    (ckpt / "quantlab.json").write_text(json.dumps(config))
    with pytest.raises(PromotionError, match="evaluated other checkpoint bytes"):
        build(ckpt, tmp_path / "eng", skip_gates=False)


def test_passing_report_promotes_and_skip_gates_is_recorded(ckpt, tmp_path):
    assert build(ckpt, tmp_path / "skipped", skip_gates=True).config.skip_gates
    _report(ckpt, passed=True, checkpoint_digest=checkpoint_digest(ckpt))
    config = build(ckpt, tmp_path / "eng", skip_gates=False).config
    assert not config.skip_gates and config.source["digest"] == checkpoint_digest(ckpt)
