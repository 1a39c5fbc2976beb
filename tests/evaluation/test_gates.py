"""check_gates is a pure function: table tests of pass/fail, signed margins and skipped gates."""

import pytest

from quantlab.evaluation.gates import Metrics, check_gates, primary_metric, task_recovery
from quantlab.recipe.schema import Gates

BASE = Metrics(perplexity=10.0, tasks={"cloze": {"acc": 0.50, "acc_stderr": 0.1},
                                       "mc": {"acc": 0.40, "acc_norm": 0.60}})


def quant(ppl=10.5, kl=0.05, top1=0.90, cloze=0.49, mc_norm=0.57):
    return Metrics(ppl, kl, top1, {"cloze": {"acc": cloze}, "mc": {"acc": 0.1, "acc_norm": mc_norm}})


@pytest.mark.parametrize(
    "gates, q, expected",
    [
        # name, value, passed, margin (positive = room to spare)
        (Gates(max_ppl_increase_pct=5), quant(), [("max_ppl_increase_pct", 5.0, True, 0.0)]),
        (Gates(max_ppl_increase_pct=4.9), quant(), [("max_ppl_increase_pct", 5.0, False, -0.1)]),
        (Gates(max_kl=0.1), quant(kl=0.05), [("max_kl", 0.05, True, 0.05)]),
        (Gates(max_kl=0.1), quant(kl=0.25), [("max_kl", 0.25, False, -0.15)]),
        (Gates(min_top1_agreement=0.85), quant(top1=0.90), [("min_top1_agreement", 0.90, True, 0.05)]),
        (Gates(min_top1_agreement=0.95), quant(top1=0.90), [("min_top1_agreement", 0.90, False, -0.05)]),
        # recovery: cloze 0.49/0.50 = 98 %, mc acc_norm 0.57/0.60 = 95 % (acc_norm is mc's primary metric,
        # so its collapsed plain acc does not count); the minimum decides.
        (Gates(min_task_recovery_pct=95), quant(), [("min_task_recovery_pct", 95.0, True, 0.0)]),
        (Gates(min_task_recovery_pct=96), quant(), [("min_task_recovery_pct", 95.0, False, -1.0)]),
        (Gates(), quant(ppl=1e9, kl=9, top1=0), []),
    ],
)
def test_gate_verdicts_and_signed_margins(gates, q, expected):
    got = [(g.name, g.value, g.passed, g.margin) for g in check_gates(BASE, q, gates)]
    assert len(got) == len(expected)
    for (name, value, passed, margin), (ename, evalue, epassed, emargin) in zip(got, expected):
        assert (name, passed) == (ename, epassed)
        assert value == pytest.approx(evalue) and margin == pytest.approx(emargin, abs=1e-9)


def test_none_gates_are_skipped_and_set_gates_keep_field_order():
    got = check_gates(BASE, quant(), Gates(max_kl=1.0, max_ppl_increase_pct=50))
    assert [g.name for g in got] == ["max_ppl_increase_pct", "max_kl"]


def test_unmeasured_metric_fails_its_gate():
    got = check_gates(Metrics(10.0), Metrics(11.0), Gates(min_task_recovery_pct=90, max_kl=0.1))
    assert [(g.name, g.value, g.passed, g.margin) for g in got] == [
        ("min_task_recovery_pct", None, False, None), ("max_kl", None, False, None)]
    assert "no task" in got[0].detail


def test_worst_task_is_named_in_detail():
    (g,) = check_gates(BASE, quant(cloze=0.25), Gates(min_task_recovery_pct=90))
    assert g.value == pytest.approx(50.0) and "cloze" in g.detail and not g.passed


def test_primary_metric_prefers_acc_norm_then_acc():
    assert primary_metric({"acc": 0.3, "acc_norm": 0.4, "acc_stderr": 0.1}) == "acc_norm"
    assert primary_metric({"perplexity": 5.0, "acc": 0.3}) == "acc"
    assert primary_metric({"perplexity": 5.0}) is None


def test_recovery_of_a_task_the_original_scores_zero_on():
    assert task_recovery({"t": {"acc": 0.0}}, {"t": {"acc": 0.0}}) == {"t": 100.0}
