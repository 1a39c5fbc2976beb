"""Teacher-forced comparison of an engine with its checkpoint's simulated model computed in the engine's order.

``quantlab verify`` scores the engine's continuation with one forward of transformers' model over each
whole sequence. For a W4A4 (NVFP4) engine that alone moves tokens: a one-ulp difference of a layer's input
can flip an FP4 activation code, and the flips multiply layer by layer (docs/engine.md, "quantlab verify").
This script removes every difference of order so that only a real difference of the engine can remain:

- the prompts are prefilled in one batch and then advanced one token per step through a KV cache, in the
  engine (its runner, greedy) and in the reference (transformers' cache) alike;
- the reference's RoPE and attention compute in float32 from float32 cos/sin and round once to the compute
  dtype, as the engine's kernels do (transformers rounds cos/sin and each product to BF16, and its CPU
  SDPA multiplies BF16 probabilities by V).

Both sides then see the same tokens, so their logits can be compared at every step. Llama-family
checkpoints without an FP8 KV cache only (the patches below are transformers' Llama modules). CPU only.

    python scripts/verify_engine_order.py ENGINE CHECKPOINT [--num-prompts 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

ATTENTION = "quantlab_engine_order"


@contextlib.contextmanager
def engine_rounding():
    """Within the block transformers' Llama rounds RoPE as the engine does, and the attention implementation
    it yields does the same for attention (``model.set_attn_implementation(name)``). Restored on exit."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface

    def rotary_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling  # float32, as rope.cos_sin

    def rope(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        turn = lambda x: (x.float() * cos + llama.rotate_half(x.float()) * sin).to(x.dtype)  # noqa: E731
        return turn(q), turn(k)

    def attention(module, q, k, v, mask, scaling=None, **kwargs):
        groups = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
        scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scaling
        n, length = q.shape[2], k.shape[2]
        future = torch.arange(length).unsqueeze(0) > torch.arange(length - n, length).unsqueeze(1)
        out = torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(future, float("-inf")).softmax(-1), v)
        return out.to(q.dtype).transpose(1, 2).contiguous(), None

    saved = llama.LlamaRotaryEmbedding.forward, llama.apply_rotary_pos_emb
    llama.LlamaRotaryEmbedding.forward, llama.apply_rotary_pos_emb = rotary_forward, rope
    AttentionInterface.register(ATTENTION, attention)
    try:
        yield ATTENTION
    finally:
        llama.LlamaRotaryEmbedding.forward, llama.apply_rotary_pos_emb = saved


def engine_logits(runner, prompts: list[list[int]], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [prompts, max_tokens] and the logits [prompts, max_tokens, vocab] that chose them: one
    batched prefill, then one decode step for all prompts at a time (how the scheduler runs them)."""
    from quantlab.engine.runner import Chunk

    per_seq = -(-(len(prompts[0]) + max_tokens) // runner.tokens_per_block)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    rows = [runner.forward([Chunk(s, 0, len(s), t, True) for s, t in zip(seqs, tables)]).float().cpu()]
    for _ in range(max_tokens - 1):
        for s, token in zip(seqs, rows[-1].argmax(-1).tolist()):
            s.append(token)
        rows.append(runner.forward([Chunk(s, len(s) - 1, 1, t, True) for s, t in zip(seqs, tables)]).float().cpu())
    logits = torch.stack(rows, 1)
    return logits.argmax(-1), logits


def reference_logits(model, prompts: list[list[int]], tokens: torch.Tensor) -> torch.Tensor:
    """The reference's logits [prompts, steps, vocab] for the same tokens, in the same order."""
    out = model(torch.tensor(prompts), use_cache=True)
    rows = [out.logits[:, -1].float()]
    for t in range(tokens.shape[1] - 1):
        out = model(tokens[:, t:t + 1], cache=out.cache, use_cache=True)
        rows.append(out.logits[:, -1].float())
    return torch.stack(rows, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine")
    parser.add_argument("checkpoint")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1:
        print("error: --num-prompts and --max-tokens must be at least 1", file=sys.stderr)
        return 2

    from quantlab.checkpoint.reader import load_quantized
    from quantlab.engine.llm import LLMEngine
    from quantlab.engine.verify import heldout_prompts
    from quantlab.errors import QuantlabError

    torch.set_grad_enabled(False)
    try:
        engine = LLMEngine(args.engine, enable_prefix_caching=False)
        model, _, _ = load_quantized(args.checkpoint, getattr(torch, engine.runner.config.dtype))
    except QuantlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.runner.device.type != "cpu" or type(model).__name__ != "LlamaForCausalLM" or \
            any(hasattr(m, "kv_quant") for m in model.modules()):
        print("error: this check covers CPU engines of Llama checkpoints without an FP8 KV cache", file=sys.stderr)
        return 2
    prompts = heldout_prompts(engine.tokenizer, args.num_prompts)
    tokens, got = engine_logits(engine.runner, prompts, args.max_tokens)
    with engine_rounding() as attention:
        model.set_attn_implementation(attention)
        want = reference_logits(model, prompts, tokens)
    lp = want.log_softmax(-1)
    gap = lp.max(-1).values - lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top1 = (want.argmax(-1) == tokens).float().mean().item()
    print(f"{args.engine} ({engine.runner.config.dtype}) against {args.checkpoint} in the engine's order, "
          f"{len(prompts)} prompts x {args.max_tokens} tokens: within 1 nat {(gap <= 1).float().mean().item():.1%}, "
          f"top-1 {top1:.1%}, max |dlogit| first step {(got[:, 0] - want[:, 0]).abs().max().item():.4g}, "
          f"all steps {(got - want).abs().max().item():.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
