"""The engine commands end to end: build -> generate (signed and checked), keygen, and verify's exit codes
(0 against the engine's own source, 3 against another model, 2 for a reference order it cannot compute)."""

from __future__ import annotations

import pytest
from engine_helpers import save_tiny
from typer.testing import CliRunner

from quantlab.cli import app

SMALL = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "128", "--max-num-tokens", "64",
         "--max-batch-size", "8"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def signed(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert invoke("keygen", "--output", root / "keys").exit_code == 0
    result = invoke("build", tiny_model[0], "--output", root / "eng", "--sign-key", root / "keys/engine-signing.key",
                    *SMALL)
    assert result.exit_code == 0, result.output
    return root


def test_build_then_generate_with_signature_check(signed):
    result = invoke("generate", signed / "eng", "t5 t6 t7", "--max-tokens", "5",
                    "--public-key", signed / "keys/engine-signing.pub", "--require-signature")
    assert result.exit_code == 0, result.output
    assert "loaded" in result.output and "5 tokens in" in result.output
    assert any(line.strip().startswith("t") for line in result.output.splitlines())


def test_generate_refuses_wrong_key_in_one_line(signed, tmp_path):
    invoke("keygen", "--output", tmp_path)
    result = invoke("generate", signed / "eng", "t5", "--public-key", tmp_path / "engine-signing.pub")
    assert result.exit_code == 2 and result.output.startswith("error:") and result.output.count("\n") == 1


def test_bad_build_flag_is_one_sentence(tiny_model, tmp_path):
    result = invoke("build", tiny_model[0], "--output", tmp_path / "e", "--kv-cache-dtype", "int3")
    assert result.exit_code == 2 and "--kv-cache-dtype must be one of auto, bf16, fp8_e4m3" in result.output


def test_verify_passes_against_own_source_and_fails_against_another(signed, tiny_model, tmp_path):
    own = invoke("verify", signed / "eng", "--against", tiny_model[0], "--num-prompts", "4", "--max-tokens", "8")
    assert own.exit_code == 0 and "PASS: 100.0%" in own.output, own.output
    assert "reference order: sequence" in own.output  # auto: an unquantized source has no 4-bit activations
    save_tiny(tmp_path / "other", seed=7)
    other = invoke("verify", signed / "eng", "--against", tmp_path / "other", "--num-prompts", "4", "--max-tokens", "8")
    assert other.exit_code == 3 and "FAIL" in other.output, other.output


def test_verify_refuses_engine_order_it_cannot_compute_in_one_sentence(signed, tiny_model):
    result = invoke("verify", signed / "eng", "--against", tiny_model[0], "--reference-order", "engine")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: --reference-order engine cannot be used here:")
    assert "is not a quantlab checkpoint" in result.output


@pytest.fixture
def recipe(make_checkpoint, tmp_path, monkeypatch):
    """A recipe whose calibrate step copies a ready checkpoint (the loop, not calibration, is under test)."""
    import shutil

    import quantlab.cli
    from quantlab.recipe.schema import SchemeGroup, WeightScheme

    ckpt = make_checkpoint([SchemeGroup(("Linear",), WeightScheme("int4", "group", 32))])
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {ckpt}\noutput: {tmp_path / 'ckpt'}\nquantization:\n  schemes:\n    - targets: [Linear]\n"
                    "      weights: {format: int4, granularity: group, group_size: 32}\nstages:\n  - rtn: {}\n"
                    "build: {max_batch_size: 8, max_seq_len: 128, max_num_tokens: 64, tokens_per_block: 4, "
                    "dtype: float32, device: cpu}\n")
    monkeypatch.setattr(quantlab.cli, "calibrate", lambda recipe, **kw: shutil.copytree(ckpt, tmp_path / "ckpt"))
    return path


@pytest.mark.parametrize("passed", [True, False])
def test_run_builds_only_after_passing_gates(recipe, tmp_path, monkeypatch, passed):
    import json

    import quantlab.evaluation.run
    from quantlab.checkpoint.digest import checkpoint_digest

    def fake_eval(checkpoint, **kw):
        (tmp_path / "ckpt" / "eval").mkdir()
        (tmp_path / "ckpt" / "eval" / "report.json").write_text(
            json.dumps({"checkpoint_digest": checkpoint_digest(checkpoint), "passed": passed}))
        return "gates " + ("pass" if passed else "FAIL"), 0 if passed else 3

    monkeypatch.setattr(quantlab.evaluation.run, "run_eval", fake_eval)
    result = invoke("run", recipe)
    assert result.exit_code == (0 if passed else 3), result.output
    assert (tmp_path / "ckpt-engine" / "engine.json").is_file() == passed
