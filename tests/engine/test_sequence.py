"""Sequence bookkeeping and check_stop's token-level stop rules."""

from quantlab.engine.sampling import SamplingParams
from quantlab.engine.sequence import Sequence, SequenceStatus, check_stop


def test_prompt_and_output_split():
    seq = Sequence("r", [5, 6, 7])
    seq.token_ids += [8, 9]
    assert seq.num_tokens == 5 and seq.num_output_tokens == 2
    assert seq.prompt_token_ids == [5, 6, 7] and seq.output_token_ids == [8, 9] and seq.last_token_id == 9
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished


def test_max_total_tokens_is_capped_by_max_seq_len():
    assert Sequence("r", range(10), SamplingParams(max_tokens=5)).max_total_tokens(100) == 15
    assert Sequence("r", range(10), SamplingParams(max_tokens=500)).max_total_tokens(100) == 100
    assert Sequence("r", range(10), SamplingParams(max_tokens=None)).max_total_tokens(100) == 100


def test_check_stop_reasons():
    seq = Sequence("r", [1, 2], SamplingParams(max_tokens=3, stop_token_ids=(42,)))
    assert check_stop(seq, eos_token_id=0) is None  # nothing generated yet, even if the prompt ends in EOS
    seq.token_ids.append(5)
    assert check_stop(seq, eos_token_id=0) is None
    seq.token_ids.append(0)
    assert check_stop(seq, eos_token_id=0) == "stop"
    assert check_stop(seq, eos_token_id=(3, 0)) == "stop"
    seq.token_ids[-1] = 42
    assert check_stop(seq, eos_token_id=None) == "stop"
    seq.token_ids[-1] = 6
    assert check_stop(seq, eos_token_id=0, max_seq_len=4) == "length"
    seq.token_ids.append(7)
    assert check_stop(seq, eos_token_id=0) == "length"


def test_ignore_eos_keeps_going_but_not_past_stop_token_ids():
    seq = Sequence("r", [1], SamplingParams(ignore_eos=True, max_tokens=None, stop_token_ids=(9,)))
    seq.token_ids.append(0)
    assert check_stop(seq, eos_token_id=0) is None
    seq.token_ids.append(9)
    assert check_stop(seq, eos_token_id=0) == "stop"
