"""The step loop (``LLMEngine``) and the offline API shaped like vLLM's (``LLM``).

``LLMEngine.step`` is three calls, as in nano-vllm: the scheduler picks the batch (decodes first, then
chunked prefills, admissions, preemptions), the runner computes the logits and the sampler picks tokens on
the device (the one host sync: reading them), and postprocessing appends the tokens, detokenizes, checks
stop conditions and retires finished sequences at once, freeing their blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .block_manager import BlockManager
from .config import RuntimeOptions
from .manifest import check_target, verify_engine
from .outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from .runner import Chunk, ModelRunner
from .sampler import SamplingTensors, sample
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, check_stop
from .tokenize import Detokenizer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    prompt_token_ids: list[int]  # one list for every output: slicing the sequence's costs O(prompt) a token
    detokenizer: Detokenizer
    metrics: RequestMetrics
    logprobs: list[dict[int, float]] | None


class LLMEngine:
    """One engine directory loaded on this machine, stepping its requests.

    Args:
        engine_dir: a directory made by ``quantlab build``.
        public_key: Ed25519 public key (PEM) the manifest's signature must verify against.
        require_signature: refuse an engine whose signature is not checked.
        **overrides: ``RuntimeOptions`` fields (kv_cache_memory_fraction, policy, enforce_eager ...).
    """

    def __init__(self, engine_dir: str | Path, public_key: str | Path | None = None, require_signature: bool = False,
                 **overrides):
        from transformers import AutoTokenizer

        start = time.perf_counter()
        self.engine_dir = Path(engine_dir)
        self.config = verify_engine(self.engine_dir, public_key, require_signature)
        self.verify_seconds = time.perf_counter() - start
        device = check_target(self.config, self.engine_dir)
        options = RuntimeOptions.from_overrides(overrides)
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine_dir)
        self.runner = ModelRunner(self.engine_dir, self.config, options, device)
        limits = self.runner.limits
        self.max_seq_len = limits.max_seq_len
        self.block_manager = BlockManager(self.runner.num_blocks, limits.tokens_per_block, options.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(limits.max_batch_size, limits.max_num_tokens, limits.max_seq_len,
                                                   options.policy), self.block_manager)
        self.requests: dict[str, _Request] = {}
        self.eos_token_ids = self.config.model.eos_token_ids
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.2f s (digests %.2f s; %d KV blocks, CUDA graphs for %s)", engine_dir,
                 self.load_seconds, self.verify_seconds, self.runner.num_blocks,
                 list(self.runner.report.graph_batch_sizes) or "none")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request; EngineRequestError (one sentence) if it is empty or cannot fit the limits."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seq = Sequence(request_id, ids, params, priority)
        self.scheduler.add(seq)
        self.requests[request_id] = _Request(seq, text, ids, Detokenizer(self.tokenizer, ids, params.stop),
                                             RequestMetrics(seq.arrival_time),
                                             [] if params.logprobs is not None else None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort"), or None."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        return self._output(self.requests.pop(request_id), finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one iteration; an output for every sequence that got a token or finished."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        now = time.monotonic()
        for s in out.scheduled:
            m = self.requests[s.seq.request_id].metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        chunks = [Chunk(s.seq.token_ids, s.seq.num_computed_tokens, s.num_new_tokens, s.seq.block_table, s.samples)
                  for s in out.scheduled]
        sampling = [s.seq for s in out.scheduled if s.samples]
        result = None
        if sampling:
            logits = self.runner.forward(chunks)
            result = sample(logits, SamplingTensors.from_seqs(sampling, logits.shape[-1], logits.device))
        else:
            self.runner.forward(chunks)
        tokens = [] if result is None else result.token_ids.tolist()
        self.scheduler.update(out, {seq.request_id: t for seq, t in zip(sampling, tokens)})
        return self._postprocess(sampling, tokens, result)

    def _postprocess(self, sampling: list[Sequence], tokens: list[int], result) -> list[RequestOutput]:
        outputs, now = [], time.monotonic()
        want_logprobs = [self.requests[s.request_id].logprobs is not None for s in sampling]
        chosen = result.logprobs.tolist() if any(want_logprobs) else None
        top = [t.tolist() for t in result.top_logprobs] if any(want_logprobs) and result.top_logprobs else None
        for i, (seq, token) in enumerate(zip(sampling, tokens)):
            req = self.requests[seq.request_id]
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.num_preemptions = seq.num_preemptions
            if req.logprobs is not None:
                entry = {token: chosen[i]}
                if top is not None:
                    entry.update({tid: v for tid, v in zip(top[0][i][: seq.params.logprobs],
                                                            top[1][i][: seq.params.logprobs])})
                req.logprobs.append(entry)
            stopped = req.detokenizer.add(token)
            reason = "stop" if stopped else check_stop(seq, self.eos_token_ids, self.max_seq_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                req.metrics.finished_time = now
                del self.requests[seq.request_id]
            outputs.append(self._output(req, finished=reason is not None))
        return outputs

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        seq = req.seq
        completion = CompletionOutput(0, req.detokenizer.visible(finished), seq.output_token_ids,
                                      seq.finish_reason if finished else None,
                                      None if req.logprobs is None else list(req.logprobs))
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        return RequestOutput(seq.request_id, req.prompt, req.prompt_token_ids, [completion], finished, req.metrics)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage, bm.prefix_hits,
                           bm.prefix_queries, self.scheduler.num_preemptions_total, bm.num_blocks, bm.num_free_blocks)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text of a chat, rendered by the model's own template with the assistant turn opened."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        """The chat's prompt tokens: the template already holds the special tokens, so none are added."""
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)


class LLM:
    """Offline batch inference over an engine directory (vLLM's ``LLM`` for the common calls).

    ``LLM(engine_dir).generate(prompts, SamplingParams(...))`` returns one RequestOutput per prompt, in order.
    """

    def __init__(self, engine_dir: str | Path, **overrides):
        self.engine = LLMEngine(engine_dir, **overrides)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params_list):
            self._counter += 1
            ids.append(str(self._counter))
            self.engine.add_request(ids[-1], prompt, p)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.engine.chat_token_ids(c) for c in conversations], params)
