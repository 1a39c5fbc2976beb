"""Sampler properties: greedy is argmax, seeded draws are a function of (seed, position) only, masks are
never escaped, the draw follows the softmax, penalties follow vLLM's definitions, logprobs are raw."""

import math

import pytest
import torch

from quantlab.engine.sampler import SamplingTensors, _mix32, apply_penalties, gumbel_noise, sample
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.sequence import Sequence

V = 32


def tensors(params: list[SamplingParams], outputs=None, prompts=None) -> SamplingTensors:
    seqs = []
    for i, p in enumerate(params):
        seq = Sequence(str(i), prompts[i] if prompts else [1, 2, 3], p)
        seq.token_ids += outputs[i] if outputs else []
        seqs.append(seq)
    return SamplingTensors.from_seqs(seqs, V, "cpu")


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_torch_hash_equals_the_exact_32_bit_integer_hash():
    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert _mix32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


def test_greedy_is_argmax_whatever_the_other_settings_and_rows():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.3, seed=i) for i in range(6)]
    assert torch.equal(sample(logits, tensors(params)).token_ids, logits.argmax(-1))
    mixed = [p if i % 2 else SamplingParams(temperature=5.0, seed=i) for i, p in enumerate(params)]
    ids = sample(logits, tensors(mixed)).token_ids
    assert torch.equal(ids[1::2], logits.argmax(-1)[1::2]) and not torch.equal(ids, logits.argmax(-1))


def test_seeded_draw_depends_on_seed_and_position_not_on_batch_row_or_call():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    alone = sample(logits, tensors([SamplingParams(seed=7)])).token_ids
    others = [SamplingParams(seed=s) for s in range(5)]
    batch = sample(logits.expand(6, V), tensors(others[:3] + [SamplingParams(seed=7)] + others[3:])).token_ids
    assert batch[3] == alone[0]
    assert torch.equal(sample(logits.expand(6, V), tensors([SamplingParams(seed=7)] * 6)).token_ids,
                       alone.expand(6))
    draws = {int(sample(logits, tensors([SamplingParams(seed=s)])).token_ids) for s in range(40)}
    assert len(draws) > 3  # different seeds draw different tokens
    later = tensors([SamplingParams(seed=7)], prompts=[[1, 2, 3, 4]])  # next position, new noise
    assert not torch.equal(gumbel_noise(later.seeds, later.positions, V),
                           gumbel_noise(tensors([SamplingParams(seed=7)]).seeds, torch.tensor([3]), V))


def test_draws_follow_the_softmax_of_tempered_logits():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n, temperature = 20000, 0.7
    logits = (probs.log() * temperature).expand(n, 4)
    params = [SamplingParams(seed=s, temperature=temperature) for s in range(n)]
    seqs = [Sequence(str(s), [1], p) for s, p in enumerate(params)]
    ids = sample(logits, SamplingTensors.from_seqs(seqs, 4, "cpu")).token_ids
    freq = torch.bincount(ids, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq  # 4 standard errors


@pytest.mark.parametrize("kwargs", [{"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.2}, {"top_k": 5, "top_p": 0.3}])
def test_never_samples_outside_the_mask(kwargs):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2)) * 2
    probs, order = logits.softmax(-1), logits.argsort(descending=True)
    allowed = set(order[: kwargs.get("top_k", V)].tolist())
    if "top_p" in kwargs:
        kept = probs[order[: kwargs.get("top_k", V)]]
        kept = kept / kept.sum()
        before = kept.cumsum(0) - kept
        allowed &= set(order[: int((before < kwargs["top_p"]).sum())].tolist())
    if "min_p" in kwargs:
        allowed &= {i for i in range(V) if probs[i] >= kwargs["min_p"] * probs.max()}
    n = 4000
    ids = sample(logits.expand(n, V), tensors([SamplingParams(seed=s, **kwargs) for s in range(n)])).token_ids
    assert set(ids.tolist()) == allowed  # all allowed tokens show up, nothing else


def test_penalties_follow_vllm_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0] + [0.0] * (V - 4)])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    t = tensors([params], outputs=[[0, 0, 1]], prompts=[[3]])
    out = apply_penalties(logits, t)[0, :4]
    # token 0: 2/2 - 0.5*2 - 0.25; token 1: -1*2 - 0.5*1 - 0.25; token 2 unseen; token 3 prompt only: 3/2
    assert torch.allclose(out, torch.tensor([2 / 2 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 0.5, 1.5]))


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9] + [0.0] * (V - 2)])
    plain = tensors([SamplingParams(temperature=0)], outputs=[[0]])
    penalized = tensors([SamplingParams(temperature=0, presence_penalty=0.5)], outputs=[[0]])
    assert sample(logits, plain).token_ids.item() == 0 and sample(logits, penalized).token_ids.item() == 1


def test_logprobs_are_raw_and_top_k_sorted():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.5, seed=1, logprobs=4), SamplingParams(logprobs=0),
              SamplingParams(temperature=0, repetition_penalty=1.5)]
    result = sample(logits, tensors(params))
    raw = logits.log_softmax(-1)
    assert torch.allclose(result.logprobs, raw.gather(1, result.token_ids[:, None]).squeeze(1))
    ids, values = result.top_logprobs
    assert ids.shape == (3, 4) and torch.equal(ids, raw.topk(4).indices) and bool((values.diff(dim=-1) <= 0).all())
    assert sample(logits, tensors([SamplingParams(logprobs=0)] * 3)).top_logprobs is None


def test_noise_is_standard_gumbel():
    noise = gumbel_noise(torch.tensor([[5, 0], [6, 0]]), torch.tensor([0, 0]), 50000)
    assert abs(noise.mean().item() - 0.5772) < 0.02 and abs(noise.var().item() - math.pi**2 / 6) < 0.05


def mixed_batch(n: int) -> list[SamplingParams]:
    kinds = [{"temperature": 0}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.1, "temperature": 1.3},
             {"repetition_penalty": 1.3, "frequency_penalty": 0.2, "logprobs": 3}]
    return [SamplingParams(seed=i, **kinds[i % len(kinds)]) for i in range(n)]


@pytest.mark.gpu
def test_cuda_sample_makes_no_host_sync_and_draws_what_the_cpu_draws():
    logits = torch.randn(10, V, generator=torch.Generator().manual_seed(4))
    params = mixed_batch(10)
    cpu = sample(logits, tensors(params, outputs=[[1, 2]] * 10))
    t = SamplingTensors.from_seqs([Sequence(str(i), [1, 2, 3, 1, 2], p) for i, p in enumerate(params)], V, "cuda")
    logits_gpu = logits.cuda()
    sample(logits_gpu, t)  # the first call compiles the fused noise: a one-time cost, not a per-step sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = sample(logits_gpu, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(gpu.token_ids.cpu(), cpu.token_ids)


@pytest.mark.gpu
def test_sample_replays_inside_a_cuda_graph_with_new_inputs():
    params = mixed_batch(8)
    seqs = [Sequence(str(i), [1, 2, 3], p) for i, p in enumerate(params)]
    t = SamplingTensors.from_seqs(seqs, V, "cuda")
    static_logits = torch.zeros(8, V, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(static_logits, t)  # warm-up outside capture, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sample(static_logits, t)
    for seed in range(3):
        logits = torch.randn(8, V, generator=torch.Generator().manual_seed(seed))
        static_logits.copy_(logits.cuda())
        t.positions.add_(1)
        graph.replay()
        eager = sample(logits.cuda(), t)
        assert torch.equal(static_out.token_ids, eager.token_ids)
