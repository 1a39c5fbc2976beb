"""Engine speed on one GPU: a Llama-3-8B-shaped BF16 engine with random weights, built and loaded on the
device, batch-1 decode tok/s beside the bandwidth limit and beside HF ``generate`` in the same run.

Usage (on the GPU machine; writes ~32 GB under --workdir):
    python bench/engine_speed.py --workdir /tmp/enginebench --out bench/results/engine_speed_h200.json

The bandwidth limit is what batch-1 decode cannot beat: every step reads every weight once (the embedding
table aside: one row) plus the KV cache of the context so far, so
``limit tok/s = copy bandwidth / (weight bytes + KV bytes per step)``, with the copy bandwidth measured
in this run (a device-to-device copy counts read + write bytes). Random weights give the same speed as
trained ones: the arithmetic and memory traffic do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, rope_theta=500000.0)
# The same architecture at toy size: bench/serving_h200.py's CPU dry run (QL_SHAPE=tiny), never a figure.
TINY_SHAPE = dict(SHAPE, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def write_random_llama(path: Path, shape: dict, layers_per_shard: int = 4, device: str = "cuda") -> None:
    """An HF-style directory (config.json, safetensors shards, a WordLevel tokenizer) of random BF16 weights."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.to_json_file(path / "config.json")
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, device=device, dtype=torch.bfloat16, generator=gen) * 0.02).cpu()

    weight_map: dict[str, str] = {}
    shard, n = {"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, 0
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shard.update({f"{p}.self_attn.q_proj.weight": rnd(h, h), f"{p}.self_attn.k_proj.weight": rnd(kv, h),
                      f"{p}.self_attn.v_proj.weight": rnd(kv, h), f"{p}.self_attn.o_proj.weight": rnd(h, h),
                      f"{p}.mlp.gate_proj.weight": rnd(i, h), f"{p}.mlp.up_proj.weight": rnd(i, h),
                      f"{p}.mlp.down_proj.weight": rnd(h, i),
                      f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        if (layer + 1) % layers_per_shard == 0 or layer == shape["num_hidden_layers"] - 1:
            n += 1
            save_file(shard, str(path / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, f"model-{n:05d}.safetensors"))
            shard = {}
    # transformers finds sharded weights only through the index.
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(v)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{shape['eos_token_id']}").save_pretrained(path)


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of ``reps``."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() * a.element_size() / sorted(times[2:])[reps // 2]


def engine_decode(engine_dir: Path, prompt: list[int], new_tokens: int) -> dict:
    from quantlab.engine.llm import LLMEngine
    from quantlab.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(engine_dir)
    load = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.add_request("bench", prompt, params)
    engine.step()  # prefill + first token
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        out = engine.step()
        steps += 1
    seconds = time.perf_counter() - t0
    r = engine.runner
    embed = r.model.embed.numel() * r.model.embed.element_size()
    m = r.model.config.model
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * torch.empty((), dtype=r.kv_dtype).element_size()
    return {"kv_bytes_per_token": kv_per_token, "load_seconds": load, "verify_seconds": engine.verify_seconds,
            "runner_load_seconds": r.report.seconds, "kv_blocks": r.num_blocks,
            "kv_cache_gib": r.report.kv_cache_bytes / 2**30, "cuda_graph_batch_sizes": list(r.report.graph_batch_sizes),
            "decode_tokens": steps, "decode_seconds": seconds, "decode_tok_s": steps / seconds,
            "weight_bytes_read_per_step": r.weight_bytes - embed + r.model.config.model.hidden_size * 2,
            "tokens": out[0].outputs[0].token_ids[:8]}


def bytes_per_step(decode: dict, prompt_tokens: int, new_tokens: int) -> float:
    """What one batch-1 decode step must read: every weight once (one embedding row) plus the KV cache of
    the mean context over the timed steps."""
    return decode["weight_bytes_read_per_step"] + decode["kv_bytes_per_token"] * (prompt_tokens + new_tokens / 2)


def hf_decode(src: Path, prompt: list[int], new_tokens: int, static: bool) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, cache_implementation="static") if static else dict(do_sample=False)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    results = {}
    for n in (1, new_tokens):  # the difference removes prefill and per-call overhead
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        results[n] = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"decode_tok_s": (new_tokens - 1) / (results[new_tokens] - results[1]), "cache": "static" if static else "dynamic"}


def save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")


def main() -> None:
    from quantlab.engine.builder import build_engine
    from quantlab.recipe.schema import BuildOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/enginebench"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    # transformers 5 compiles the model for a static cache inside generate(), so a timed call includes
    # compilation: off by default, its figure is not a steady-state rate.
    ap.add_argument("--hf-static", action="store_true")
    args = ap.parse_args()
    res = {"command": "python bench/engine_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "python": platform.python_version(), "shape": {k: v for k, v in SHAPE.items() if k != "rope_scaling"}}
    src, eng = args.workdir / "llama3-8b-random", args.workdir / "engine-bf16"
    t0 = time.perf_counter()
    write_random_llama(src, SHAPE)
    res["write_random_source_seconds"] = time.perf_counter() - t0
    summary = build_engine(str(src), eng, BuildOptions(max_batch_size=16, max_seq_len=2048, max_num_tokens=2048,
                                                       device="cuda"), overwrite=True)
    res["build_seconds"], res["engine_gib"] = summary.seconds, summary.bytes / 2**30
    save(args.out, res)
    prompt = torch.randint(0, SHAPE["vocab_size"], (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    res["engine"] = engine_decode(eng, prompt, args.new_tokens)
    torch.cuda.empty_cache()
    bw = copy_bandwidth()
    step_bytes = bytes_per_step(res["engine"], args.prompt_tokens, args.new_tokens)
    res["copy_bandwidth_gb_s"] = bw / 1e9
    res["bytes_per_step_gb"] = step_bytes / 1e9
    res["bandwidth_limit_tok_s"] = bw / step_bytes
    res["engine_fraction_of_limit"] = res["engine"]["decode_tok_s"] / res["bandwidth_limit_tok_s"]
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    save(args.out, res)  # the engine's figures survive a failure of the HF runs below
    res["hf_generate"] = []
    for static in (False, True) if args.hf_static else (False,):
        try:
            res["hf_generate"].append(hf_decode(src, prompt, args.new_tokens, static=static))
        except Exception as e:  # noqa: BLE001 - record why a baseline is missing instead of losing the run
            res["hf_generate"].append({"cache": "static" if static else "dynamic", "error": str(e).splitlines()[0]})
    save(args.out, res)
    print(f"{'':28s}{'tok/s':>10s}")
    print(f"{'bandwidth limit':28s}{res['bandwidth_limit_tok_s']:10.1f}   ({bw / 1e9:.0f} GB/s, {step_bytes / 1e9:.2f} GB/step)")
    print(f"{'quantlab engine (batch 1)':28s}{res['engine']['decode_tok_s']:10.1f}   load {res['engine']['load_seconds']:.1f} s "
          f"(digests {res['engine']['verify_seconds']:.1f} s), graphs {res['engine']['cuda_graph_batch_sizes']}")
    for h in res["hf_generate"]:
        print(f"{'HF generate (' + h['cache'] + ')':28s}{h.get('decode_tok_s', float('nan')):10.1f}   {h.get('error', '')}")
    print(f"build {res['build_seconds']:.1f} s ({res['engine_gib']:.1f} GiB)")


if __name__ == "__main__":
    main()
