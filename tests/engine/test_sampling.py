"""SamplingParams: vLLM's defaults and normalizations, and one clear SamplingError per bad field."""

import pytest

from quantlab.engine.sampling import MAX_LOGPROBS, SamplingParams
from quantlab.errors import QuantlabError, SamplingError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert not p.greedy and not p.has_penalties and SamplingError.__mro__[1] is QuantlabError


def test_vllm_spellings_are_normalized():
    p = SamplingParams(top_k=-1, stop="\n", stop_token_ids=[7, 8])
    assert p.top_k == 0 and p.stop == ("\n",) and p.stop_token_ids == (7, 8)
    assert hash(p) == hash(SamplingParams(top_k=0, stop=("\n",), stop_token_ids=(7, 8)))


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", 1.1), ("seed", -1), ("max_tokens", 0), ("stop", [""]),
    ("stop_token_ids", [-1]), ("ignore_eos", 1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("n", True),
])
def test_out_of_range_field_is_named_in_one_sentence(field, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field + " must be") and message.endswith(")") and "(got " in message
    assert "\n" not in message


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(presence_penalty=0.5).has_penalties
    assert SamplingParams(repetition_penalty=1.2).has_penalties
