"""``quantlab verify --reference-order engine``: the reference computed in the engine's order.

The whole-sequence reference (engine/verify.py) scores the engine's continuation with one forward of
transformers' model over each whole sequence. For a W4A4 (NVFP4) engine that alone moves tokens: a one-ulp
difference of a layer's input can flip an FP4 activation code, and the flips multiply layer by layer
(docs/engine.md, "quantlab verify"), so a correct BF16 engine fails. Here every difference of order is
removed, so that only a real difference of the engine can remain:

- the prompts are prefilled in one batch and then advanced one token per step through a KV cache, in the
  engine (its runner, greedy) and in the reference (transformers' cache) alike;
- the reference computes in the engine's dtype, and its RoPE and attention compute in float32 from float32
  cos/sin and round once to that dtype, as the engine's kernels do (transformers rounds cos/sin and each
  product to BF16, and its CPU SDPA multiplies BF16 probabilities by V).

Supported for CPU engines of Llama checkpoints without an FP8 KV cache (the patches below are transformers'
Llama modules; a CUDA engine's kernels round in their own order). ``auto`` picks this order for checkpoints
with 4-bit activations and the whole-sequence reference otherwise.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from quantlab.errors import QuantlabError

from .verify import DEFAULT_GAP, VerifyResult, heldout_prompts, score_prompt

ORDERS = ("sequence", "engine", "auto")
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


def _check_fits(runner, prompts: list[list[int]], max_tokens: int) -> int:
    """KV blocks per sequence; QuantlabError when the prompts cannot run as one batch within the engine's limits
    (the order under test is one batched prefill, so they are not split)."""
    limits = runner.limits
    longest = max(len(p) for p in prompts) + max_tokens
    per_seq = -(-longest // runner.tokens_per_block)
    if len(prompts) > limits.max_batch_size or sum(map(len, prompts)) > limits.max_num_tokens or \
            longest > limits.max_seq_len or len(prompts) * per_seq > runner.num_blocks:
        raise QuantlabError(f"{len(prompts)} prompts of up to {longest} tokens do not fit one batch of this engine "
                            f"(at most {limits.max_batch_size} sequences, {limits.max_num_tokens} prefill tokens, "
                            f"{limits.max_seq_len} tokens each); ask for fewer --num-prompts or --max-tokens")
    return per_seq


def engine_logits(runner, prompts: list[list[int]], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [prompts, max_tokens] and the logits [prompts, max_tokens, vocab] that chose them: one
    batched prefill, then one decode step for all prompts at a time (how the scheduler runs them). The
    prompts must be of one length (held-out windows are)."""
    from .runner import Chunk

    per_seq = _check_fits(runner, prompts, max_tokens)
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


def has_4bit_activations(source: str | Path) -> bool:
    """True when ``source`` is a checkpoint that quantizes some Linear's input activations to 4 bits (NVFP4
    W4A4), the case where the whole-sequence reference judges the order of sums rather than the engine."""
    from quantlab import formats
    from quantlab.checkpoint import schema
    from quantlab.checkpoint.stream import is_checkpoint, open_checkpoint

    if not is_checkpoint(source):
        return False
    groups = open_checkpoint(source).quantization_config["config_groups"].values()
    acts = [schema.activation_scheme(g.get("input_activations")) for g in groups]
    return any(a is not None and formats.get_spec(a.format).bits == 4 for a in acts)


def unsupported(engine_dir: str | Path, source: str | Path) -> str | None:
    """Why the engine-order reference cannot check ``engine_dir`` against ``source`` (a sentence fragment),
    or None when it can. Reads engine.json and the checkpoint's JSON only."""
    from quantlab.checkpoint.stream import is_checkpoint, open_checkpoint

    from .config import EngineConfig

    if EngineConfig.load(engine_dir).target["device"] != "cpu":
        return "the engine is built for CUDA, and engine order covers CPU engines only"
    if not is_checkpoint(source):
        return f"{source} is not a quantlab checkpoint"
    ckpt = open_checkpoint(source)
    if ckpt.config.get("architectures") != ["LlamaForCausalLM"]:
        return f"{source} is a {ckpt.config.get('architectures')} model, and engine order covers Llama models only"
    if ckpt.kv_cache is not None:
        return f"{source} quantizes the KV cache to FP8, which engine order does not cover"
    return None


def choose_order(requested: str, engine_dir: str | Path, source: str | Path) -> tuple[str, str | None]:
    """(``sequence`` or ``engine``, a one-line note or None) for ``--reference-order requested``.

    ``auto`` takes engine order for checkpoints with 4-bit activations and falls back, with a note, where
    engine order is not supported; an explicit ``engine`` there raises QuantlabError."""
    if requested not in ORDERS:
        raise QuantlabError(f"--reference-order must be one of {', '.join(ORDERS)} (got {requested!r})")
    if requested == "sequence" or (requested == "auto" and not has_4bit_activations(source)):
        return "sequence", None
    why = unsupported(engine_dir, source)
    if why is None:
        return "engine", None
    if requested == "engine":
        raise QuantlabError(f"--reference-order engine cannot be used here: {why}")
    return "sequence", f"note: 4-bit activations, but {why}; scoring against the whole-sequence reference"


def verify_in_engine_order(engine_dir: str | Path, source: str | Path, num_prompts: int = 16, max_tokens: int = 24,
                           logprob_gap: float = DEFAULT_GAP, prompts: list[list[int]] | None = None,
                           reference_dtype: torch.dtype | None = None) -> VerifyResult:
    """Teacher-forced comparison of ``engine_dir`` with ``source``'s simulated model computed in the engine's
    order (module docstring), in ``reference_dtype`` (default the engine's dtype), scored as
    ``verify_engine_against`` scores."""
    from quantlab.checkpoint.reader import load_quantized

    from .llm import LLMEngine

    engine = LLMEngine(engine_dir, enable_prefix_caching=False)  # idle engine = every block free
    prompts = prompts or heldout_prompts(engine.tokenizer, num_prompts)
    dtype = reference_dtype or engine.runner.dtype
    with torch.no_grad():
        tokens, got = engine_logits(engine.runner, prompts, max_tokens)
        del engine
        model = load_quantized(source, dtype)[0]
        with engine_rounding() as attention:
            model.set_attn_implementation(attention)
            want = reference_logits(model, prompts, tokens)
    vocab = want.shape[-1]
    results = tuple(score_prompt(want[i], tokens[i].tolist(), logprob_gap,
                                 (got[i, 0, :vocab] - want[i, 0]).abs().max().item()) for i in range(len(prompts)))
    return VerifyResult(results, logprob_gap, "engine")


def verify(engine_dir: str | Path, source: str | Path, reference_order: str = "auto", num_prompts: int = 16,
           max_tokens: int = 24, logprob_gap: float = DEFAULT_GAP,
           reference_dtype: torch.dtype | None = None) -> tuple[VerifyResult, str | None]:
    """``quantlab verify``: (result, a one-line note or None) with the reference order ``choose_order`` picks.
    ``reference_dtype`` defaults to float32 in sequence order and to the engine's dtype in engine order."""
    from .verify import verify_engine_against

    order, note = choose_order(reference_order, engine_dir, source)
    if order == "engine":
        return verify_in_engine_order(engine_dir, source, num_prompts=num_prompts, max_tokens=max_tokens,
                                      logprob_gap=logprob_gap, reference_dtype=reference_dtype), note
    return verify_engine_against(engine_dir, source, num_prompts=num_prompts, max_tokens=max_tokens,
                                 logprob_gap=logprob_gap, reference_dtype=reference_dtype or torch.float32), note
