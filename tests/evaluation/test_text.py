"""The held-out text is found through quantlab.data's resolver, from any working directory, or refused
in one sentence saying where to point."""

import pytest

from quantlab.errors import QuantlabError
from quantlab.evaluation.text import dataset_files


def test_bundled_heldout_file_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (f,) = dataset_files("calib_data/heldout/apache-2.0.txt")
    assert f.is_file() and "Apache License" in f.read_text()


def test_bundled_heldout_directory_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [f.name for f in dataset_files("calib_data/heldout")]
    assert "apache-2.0.txt" in names and names == sorted(names)


def test_a_directory_lists_its_text_files_in_name_order(tmp_path):
    for name in ("b.jsonl", "a.txt", "skip.md"):
        (tmp_path / name).write_text("x")
    assert [f.name for f in dataset_files(str(tmp_path))] == ["a.txt", "b.jsonl"]


def test_missing_eval_text_is_one_sentence_naming_eval_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantlabError) as e:
        dataset_files("nowhere/held.txt")
    message = str(e.value)
    assert message.startswith("eval.dataset: data file nowhere/held.txt not found") and "\n" not in message
