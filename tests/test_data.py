"""Calibration sets: the default data resolves from any directory, text is cut into consecutive windows
shuffled by the seed, and the digest fingerprints exactly the tokens used."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from quantlab import data
from quantlab.errors import QuantlabError
from quantlab.recipe.schema import CalibrationConfig


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def test_default_data_resolves_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = data.resolve_data_path(CalibrationConfig().dataset)
    assert path.is_file() and path == data.DATA_ROOT / "calib_data" / "gpl-3.txt"


def test_missing_data_file_says_where_it_looked_and_where_to_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantlabError) as e:
        data.resolve_data_path("nope.txt")
    assert str(e.value) == (f"data file nope.txt not found in {tmp_path} nor in quantlab's bundled data "
                            f"({data.DATA_ROOT}); point the recipe's dataset at an existing text or JSONL file")


def test_windows_are_consecutive_and_drop_the_short_tail(tokenizer):
    windows = data.token_windows(["w1 w2 w3", "w4 w5"], tokenizer, seq_len=2)
    assert windows.tolist() == [[1, 2], [3, 4]]  # w5 is the dropped tail
    with pytest.raises(QuantlabError, match="fewer than one window of seq_len=9"):
        data.token_windows(["w1 w2"], tokenizer, seq_len=9)


def test_jsonl_rows_are_documents_and_a_missing_field_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": t}) for t in ["w1 w2", "", "w3"]) + "\n")
    assert data.load_texts(str(f), "body") == ["w1 w2", "w3"]
    with pytest.raises(QuantlabError, match=r"has no field 'text' \(fields: body\)"):
        data.load_texts(str(f))


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("w1 w2\n\nw3\n")
    assert data.load_texts(str(f)) == ["w1 w2\n\nw3\n"]


def test_calibration_set_is_seeded_repeats_short_text_and_digests_its_tokens(tmp_path, tokenizer):
    f = tmp_path / "d.txt"
    f.write_text(" ".join(f"w{i}" for i in range(1, 13)))  # 12 tokens = 3 windows of 4
    cfg = CalibrationConfig(dataset=str(f), num_samples=5, seq_len=4, seed=7)
    a, b = data.build_calibration_set(cfg, tokenizer), data.build_calibration_set(cfg, tokenizer)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (5, 4)
    # the documented rule: windows shuffled by torch.randperm under the seed, the list repeated to fill
    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    order = torch.randperm(3, generator=torch.Generator().manual_seed(7))
    assert a.input_ids.tolist() == windows[order.repeat(2)[:5]].tolist()
    assert a.digest == hashlib.sha256(a.input_ids.numpy().astype("<i8").tobytes()).hexdigest()
    assert a.source == str(f)
