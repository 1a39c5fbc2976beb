"""The offline task data is a deterministic function of the held-out text, and only of it."""

import importlib.util
import json
import re

from quantlab.evaluation.tasks import TASKS_DIR, offline_tasks

_spec = importlib.util.spec_from_file_location("build_tasks", TASKS_DIR / "build_tasks.py")
build_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_tasks)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rebuilding_reproduces_the_committed_files_byte_for_byte(tmp_path):
    build_tasks.main(["--out", str(tmp_path)])
    for name in offline_tasks():
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TASKS_DIR / "data" / f"{name}.jsonl").read_bytes(), name


def test_a_different_seed_gives_a_different_sample(tmp_path):
    build_tasks.main(["--out", str(tmp_path), "--seed", "1"])
    assert (tmp_path / "quantlab_cloze.jsonl").read_bytes() != (TASKS_DIR / "data" / "quantlab_cloze.jsonl").read_bytes()


def test_sources_are_held_out_files_only():
    assert build_tasks.HELDOUT.name == "heldout"
    assert all((build_tasks.HELDOUT / s).is_file() for s in build_tasks.SOURCES)
    for name in offline_tasks():
        assert {r["source"] for r in rows(TASKS_DIR / "data" / f"{name}.jsonl")} <= set(build_tasks.SOURCES)


def test_cloze_targets_are_single_words_already_seen_in_the_passage():
    data = rows(TASKS_DIR / "data" / "quantlab_cloze.jsonl")
    assert 200 <= len(data) <= 300
    for r in data:
        word = r["target"][1:]
        assert r["target"].startswith(" ") and word.isalpha() and len(word) >= 4
        assert word in re.findall(r"[A-Za-z]+", r["context"])


def test_continuation_has_four_distinct_endings_and_the_truth_at_label():
    data = rows(TASKS_DIR / "data" / "quantlab_continuation.jsonl")
    assert 200 <= len(data) <= 300
    for r in data:
        assert len(r["endings"]) == 4 == len(set(r["endings"])) and 0 <= r["label"] < 4
    labels = [r["label"] for r in data]
    assert all(labels.count(k) > len(data) / 8 for k in range(4))  # the answer position is not a giveaway


def test_the_offline_task_yamls_are_found():
    assert offline_tasks() == ["quantlab_cloze", "quantlab_continuation"]
