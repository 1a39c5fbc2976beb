"""Scheduler driven by a fake model that reads its context back from a simulated paged KV cache, so wrong
block tables, a bad prefix share or a broken recompute after preemption change the generated tokens."""

import random

import pytest

from quantlab.engine.block_manager import BlockManager
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.scheduler import Scheduler, SchedulerConfig
from quantlab.engine.sequence import Sequence, SequenceStatus, check_stop
from quantlab.errors import EngineRequestError

TPB, VOCAB, EOS = 4, 50, 0


def next_token(history: list[int]) -> int:
    """A deterministic stand-in for greedy decoding: any change in the history changes the answer."""
    return (sum((i + 1) * t for i, t in enumerate(history)) * 2654435761 + len(history)) % VOCAB


def reference(prompt: list[int], params: SamplingParams, max_seq_len: int) -> list[int]:
    """The same fake model run alone, with no cache at all."""
    seq = Sequence("ref", prompt, params)
    while True:
        seq.token_ids.append(next_token(seq.token_ids))
        if check_stop(seq, EOS, max_seq_len):
            return seq.output_token_ids


class Engine:
    """Runs scheduler steps: writes each chunk's tokens into `kv` at the slots its block table names,
    then predicts from the tokens read back out of `kv`, and checks the invariants after every step."""

    def __init__(self, num_blocks, policy, max_batch_size=8, max_num_tokens=16, max_seq_len=64):
        self.config = SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len, policy)
        self.bm = BlockManager(num_blocks, TPB)
        self.scheduler = Scheduler(self.config, self.bm)
        self.kv = [[None] * TPB for _ in range(num_blocks)]
        self.steps = []

    def step(self):
        out = self.scheduler.schedule()
        assert out.num_tokens <= self.config.max_num_tokens
        assert len(out.scheduled) <= self.config.max_batch_size
        assert all(c.seq.status is SequenceStatus.RUNNING for c in out.scheduled), "scheduled a preempted seq"
        sampled = {}
        for chunk in out.scheduled:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            for pos in range(start, start + chunk.num_new_tokens):
                block = seq.block_table[pos // TPB]
                assert self.bm.ref_counts[block] == 1, "wrote into a block another sequence shares"
                self.kv[block][pos % TPB] = seq.token_ids[pos]
            if chunk.samples:
                context = [self.kv[seq.block_table[p // TPB]][p % TPB] for p in range(seq.num_tokens)]
                sampled[seq.request_id] = next_token(context)
        self.scheduler.update(out, sampled)
        for chunk in out.scheduled:
            if chunk.seq.status is SequenceStatus.RUNNING:
                reason = check_stop(chunk.seq, EOS, self.config.max_seq_len)
                if reason:
                    self.scheduler.finish(chunk.seq, reason)
        self.bm.check_integrity()
        self.steps.append(out)
        return out

    def run(self, max_steps=2000):
        while self.scheduler.has_unfinished():
            self.step()
            assert len(self.steps) < max_steps, "no progress"


def workload(seed, n=12):
    rng = random.Random(seed)
    shared = [rng.randrange(1, VOCAB) for _ in range(9)]
    seqs = []
    for i in range(n):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 20), ignore_eos=i % 4 == 0)
        seqs.append(Sequence(f"r{i}", prompt, params, priority=rng.randrange(3), arrival_time=float(i)))
    return seqs


@pytest.mark.parametrize("policy", ["guaranteed_no_evict", "max_utilization"])
@pytest.mark.parametrize("seed", [0, 1])
def test_outputs_equal_an_unbatched_run_with_budget_respected_every_step(policy, seed):
    engine = Engine(num_blocks=14, policy=policy)
    seqs = workload(seed)
    for seq in seqs:
        engine.scheduler.add(seq)
    engine.run()
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, seq.params, 64), seq.request_id
    assert engine.bm.num_free_blocks == 14 and engine.bm.prefix_hits > 0
    assert any(len(out.scheduled) > 1 for out in engine.steps)
    if policy == "guaranteed_no_evict":
        assert engine.scheduler.num_preemptions_total == 0
    else:
        assert engine.scheduler.num_preemptions_total > 0  # preempted and resumed, same tokens


def test_decodes_come_first_and_long_prompts_are_chunked_beside_them():
    engine = Engine(num_blocks=40, policy="guaranteed_no_evict", max_num_tokens=8)
    engine.scheduler.add(Sequence("short", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True)))
    engine.step()
    engine.scheduler.add(Sequence("long", list(range(1, 30)), SamplingParams(max_tokens=2)))
    chunks = []
    while engine.scheduler.has_unfinished():
        prefilling = engine.scheduler.waiting + [s for s in engine.scheduler.running if s.num_output_tokens == 0]
        out = engine.step()
        sizes = {c.seq.request_id: c.num_new_tokens for c in out.scheduled}
        if any(s.request_id == "long" for s in prefilling):
            assert list(sizes) == ["short", "long"] and sizes["short"] == 1  # the decode went first
            chunks.append(sizes["long"])
    assert chunks == [7, 7, 7, 7, 1]  # 29 prompt tokens in a budget of 8 less the decode


def test_guaranteed_no_evict_reserves_whole_lives_and_max_utilization_admits_more():
    def first_step(policy):
        engine = Engine(num_blocks=12, policy=policy, max_num_tokens=64)
        for i in range(6):
            engine.scheduler.add(Sequence(f"r{i}", [i + 1] * 5, SamplingParams(max_tokens=11, ignore_eos=True)))
        engine.step()
        return engine
    guaranteed, utilization = first_step("guaranteed_no_evict"), first_step("max_utilization")
    assert guaranteed.scheduler.num_running == 3  # 16 tokens = 4 blocks each, 12 blocks
    assert all(len(s.block_table) == 4 for s in guaranteed.scheduler.running)
    assert utilization.scheduler.num_running == 6  # 2 blocks each for the prompt alone


def test_max_batch_size_caps_the_running_set():
    engine = Engine(num_blocks=64, policy="max_utilization", max_batch_size=2, max_num_tokens=64)
    for i in range(5):
        engine.scheduler.add(Sequence(f"r{i}", [i + 1] * 3, SamplingParams(max_tokens=4, ignore_eos=True)))
    while engine.scheduler.has_unfinished():
        engine.step()
        assert engine.scheduler.num_running <= 2
    assert max(len(out.scheduled) for out in engine.steps) == 2 and len(engine.steps) > 4


def test_preemption_takes_lowest_priority_then_latest_arrival():
    engine = Engine(num_blocks=6, policy="max_utilization", max_num_tokens=64)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for rid, priority, arrival in [("a", 0, 0.0), ("b", 1, 1.0), ("c", 1, 2.0)]:
        engine.scheduler.add(Sequence(rid, [7] * 7, params, priority=priority, arrival_time=arrival))
    victims = []
    while not victims:
        victims = [s.request_id for s in engine.step().preempted]
    assert victims == ["c"]


def test_a_victim_already_scheduled_this_step_is_unscheduled_and_its_tokens_refunded():
    engine = Engine(num_blocks=6, policy="max_utilization", max_num_tokens=8)
    engine.scheduler.add(Sequence("d", [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True), 1, 0.0))
    engine.step()
    engine.scheduler.add(Sequence("p", list(range(1, 21)), SamplingParams(max_tokens=1), 0, 1.0))
    engine.step(), engine.step()  # "p" prefills 7 + 7 tokens beside the decodes of "d"; the pool is full
    out = engine.step()  # the decode of "d" is scheduled first, then "p" needs a block: "d" is the victim
    assert [s.request_id for s in out.preempted] == ["d"]
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.scheduled] == [("p", 6)]


def test_higher_priority_is_admitted_first_even_if_later():
    engine = Engine(num_blocks=4, policy="guaranteed_no_evict")
    engine.scheduler.add(Sequence("low", [1] * 8, SamplingParams(max_tokens=8), priority=5, arrival_time=0.0))
    engine.scheduler.add(Sequence("high", [2] * 8, SamplingParams(max_tokens=8), priority=0, arrival_time=1.0))
    out = engine.step()
    assert [c.seq.request_id for c in out.scheduled] == ["high"]


def test_a_smaller_request_does_not_overtake_a_blocked_more_important_one():
    engine = Engine(num_blocks=4, policy="guaranteed_no_evict")
    engine.scheduler.add(Sequence("a", [1] * 4, SamplingParams(max_tokens=4, ignore_eos=True), 0, 0.0))
    engine.step()
    engine.scheduler.add(Sequence("big", [2] * 8, SamplingParams(max_tokens=4), 0, 1.0))
    engine.scheduler.add(Sequence("small", [3], SamplingParams(max_tokens=1), 1, 2.0))
    out = engine.step()
    assert [c.seq.request_id for c in out.scheduled] == ["a"] and engine.scheduler.num_waiting == 2


def test_abort_frees_blocks_at_once_and_is_skipped_by_update():
    engine = Engine(num_blocks=20, policy="max_utilization")
    for rid in "abc":
        engine.scheduler.add(Sequence(rid, [3] * 9, SamplingParams(max_tokens=5)))
    out = engine.scheduler.schedule()
    used = 20 - engine.bm.num_free_blocks
    seq = engine.scheduler.abort("a")
    assert seq.finish_reason == "abort" and seq.block_table == [] and seq.is_finished
    assert engine.bm.num_free_blocks == 20 - used + 3
    engine.scheduler.update(out, {c.seq.request_id: 1 for c in out.scheduled if c.samples})
    assert seq.num_tokens == 9
    assert engine.scheduler.abort("a") is None and engine.scheduler.abort("nope") is None
    engine.scheduler.abort("b"), engine.scheduler.abort("c")
    assert engine.bm.num_free_blocks == 20 and not engine.scheduler.has_unfinished()
    engine.bm.check_integrity()


@pytest.mark.parametrize("prompt_len, max_tokens, words", [
    (0, 4, "empty prompt"), (60, 5, "max_tokens=5 within max_seq_len=64"),
    (64, None, "no room for one generated token"), (40, 20, "the KV cache has 10"),
])
def test_add_refuses_what_cannot_run_in_one_sentence(prompt_len, max_tokens, words):
    engine = Engine(num_blocks=10, policy="max_utilization")
    with pytest.raises(EngineRequestError, match=words) as info:
        engine.scheduler.add(Sequence("x", [1] * prompt_len, SamplingParams(max_tokens=max_tokens)))
    assert "\n" not in str(info.value) and not engine.scheduler.has_unfinished()


def test_duplicate_request_id_is_refused():
    engine = Engine(num_blocks=10, policy="max_utilization")
    engine.scheduler.add(Sequence("x", [1, 2]))
    with pytest.raises(EngineRequestError, match="already in use"):
        engine.scheduler.add(Sequence("x", [1, 2]))
