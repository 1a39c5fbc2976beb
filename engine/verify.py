"""``quantlab verify``: is the engine computing the model it was built from?

Greedy continuations of two correct implementations part at the first near-tie and never meet again, so
comparing continuations token by token judges the tie, not the engine. Instead the check is
teacher-forced: the engine generates greedily, the reference model (the checkpoint's simulated-quantization
model in float32, or transformers' float model for an unquantized source) scores the engine's own
continuation in one forward, and each generated token must be the reference's argmax or within
``logprob_gap`` nats of it, given the engine's own prefix. A wrong kernel, a mis-fused projection or a
wrong scale pushes tokens far from the reference's choices; rounding differences only flip near-ties.

Reported per prompt: the fraction within the gap, top-1 agreement, prefix agreement (tokens before the
first disagreement, which is where free-running greedy outputs would part) and the largest logit difference
at the first step (the prompt's last position, where both saw identical input).

This module's reference scores each whole sequence in one forward (``--reference-order sequence``);
engine/verify_order.py computes it in the engine's order instead, for W4A4 engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.checkpoint.stream import is_checkpoint

HELDOUT = ("calib_data/heldout/apache-2.0.txt", "calib_data/heldout/lgpl-2.1.txt",
           "calib_data/heldout/mpl-2.0.txt", "calib_data/heldout/stdlib_docstrings.jsonl")
PROMPT_TOKENS = 32
# Chosen from measurement (docs/engine.md, "quantlab verify"): the smallest gap and highest threshold that
# every correct engine measured there clears with room, while engines of another checkpoint fall far below.
DEFAULT_GAP = 1.0
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class PromptResult:
    num_tokens: int
    within_gap: float
    top1: float
    prefix: int
    first_step_max_logit_diff: float


@dataclass(frozen=True)
class VerifyResult:
    """Per-prompt results, the gap they were scored with, and the reference's order: ``sequence`` (one
    forward per whole sequence) or ``engine`` (batched prefill, then one token per step; verify_order.py)."""

    prompts: tuple[PromptResult, ...]
    logprob_gap: float
    reference_order: str = "sequence"

    def _mean(self, field: str) -> float:
        n = sum(p.num_tokens for p in self.prompts)
        return sum(getattr(p, field) * p.num_tokens for p in self.prompts) / max(n, 1)

    @property
    def within_gap(self) -> float:
        return self._mean("within_gap")

    @property
    def top1(self) -> float:
        return self._mean("top1")

    @property
    def prefix_agreement(self) -> float:
        return sum(p.prefix for p in self.prompts) / max(sum(p.num_tokens for p in self.prompts), 1)

    @property
    def max_first_step_logit_diff(self) -> float:
        return max(p.first_step_max_logit_diff for p in self.prompts)

    def summary(self) -> str:
        how = {"sequence": "one forward per whole sequence",
               "engine": "the engine's order: batched prefill, then one token per step through a KV cache"}
        lines = [f"reference order: {self.reference_order} ({how[self.reference_order]})",
                 "prompt  tokens  within-gap  top-1   prefix  first-step max |dlogit|"]
        for i, p in enumerate(self.prompts):
            lines.append(f"{i:6d}  {p.num_tokens:6d}  {p.within_gap:10.1%}  {p.top1:5.1%}  {p.prefix:6d}  "
                         f"{p.first_step_max_logit_diff:.4f}")
        lines.append(f"all: within {self.logprob_gap:g} nats of the reference's argmax {self.within_gap:.1%}, "
                     f"top-1 {self.top1:.1%}, prefix agreement {self.prefix_agreement:.1%}, first-step max "
                     f"|dlogit| {self.max_first_step_logit_diff:.4f}")
        return "\n".join(lines)


def heldout_prompts(tokenizer, num_prompts: int, prompt_tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    """``num_prompts`` windows of ``prompt_tokens`` tokens spread evenly over the held-out files, in turn."""
    from quantlab.data import load_texts, token_windows

    windows = [token_windows(load_texts(f), tokenizer, prompt_tokens) for f in HELDOUT]
    prompts = []
    for i in range(num_prompts):
        w = windows[i % len(windows)]
        k = i // len(windows)
        prompts.append(w[(k * len(w)) // -(-num_prompts // len(windows))].tolist())
    return prompts


def load_reference(source: str | Path, dtype: torch.dtype = torch.float32):
    """The reference model of a checkpoint (simulated quantization) or an unquantized model, in ``dtype``."""
    if is_checkpoint(source):
        from quantlab.checkpoint.reader import load_quantized

        return load_quantized(source, dtype)[0]
    from quantlab.models import load_model

    return load_model(str(source), dtype)[0]


def score_prompt(logits: torch.Tensor, tokens: list[int], logprob_gap: float,
                 first_step_max_logit_diff: float) -> PromptResult:
    """One prompt's result from the reference's logits [len(tokens), vocab] at the positions that chose
    ``tokens`` (row i scores tokens[i] given the engine's own prefix)."""
    rows = logits.float().log_softmax(-1)
    chosen = rows.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    gap = rows.max(-1).values - chosen
    agree = (rows.argmax(-1) == torch.tensor(tokens)).tolist()
    prefix = agree.index(False) if False in agree else len(agree)
    return PromptResult(len(tokens), (gap <= logprob_gap).float().mean().item(), sum(agree) / len(agree), prefix,
                        first_step_max_logit_diff)


def _first_step_logits(engine, prompt: list[int]) -> torch.Tensor:
    """The engine's logits at the prompt's last position, computed in free blocks while the engine is idle."""
    from .runner import Chunk

    blocks = list(range(-(-len(prompt) // engine.runner.tokens_per_block)))
    return engine.runner.forward([Chunk(prompt, 0, len(prompt), blocks, True)])[0].float().cpu()


def verify_engine_against(engine_dir: str | Path, source: str | Path, num_prompts: int = 16, max_tokens: int = 24,
                          logprob_gap: float = DEFAULT_GAP, prompts: list[list[int]] | None = None,
                          reference_dtype: torch.dtype = torch.float32) -> VerifyResult:
    """Teacher-forced comparison of ``engine_dir`` with the reference model of ``source`` (module docstring),
    the reference computing in ``reference_dtype``."""
    from .llm import LLMEngine
    from .sampling import SamplingParams

    engine = LLMEngine(engine_dir, enable_prefix_caching=False)  # idle engine = every block free
    prompts = prompts or heldout_prompts(engine.tokenizer, num_prompts)
    first = [_first_step_logits(engine, p) for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy)
    generated: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                generated[out.request_id] = out.outputs[0].token_ids
    del engine
    reference = load_reference(source, reference_dtype)
    results = []
    for i, p in enumerate(prompts):
        tokens = generated[str(i)]
        with torch.no_grad():
            logits = reference(torch.tensor([p + tokens])).logits[0].float()
        ref_first = logits[len(p) - 1]  # causal: the same as scoring the prompt alone
        results.append(score_prompt(logits[len(p) - 1: len(p) - 1 + len(tokens)], tokens, logprob_gap,
                                    (first[i][: ref_first.shape[0]] - ref_first).abs().max().item()))
    return VerifyResult(tuple(results), logprob_gap)
