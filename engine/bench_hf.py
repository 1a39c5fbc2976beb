"""The `--baseline hf` run: the benchmark's own prompts through plain transformers `generate`, on the same
device, model and dtype, in the same process, so the engine's speed-up is a ratio measured side by side.

Requests go in batches of `batch_size` in workload order, left-padded, greedy, each batch generating
exactly its longest requested output (`min_new_tokens` = `max_new_tokens`; HF has no per-row stop
at a length). Only the tokens each request asked for are counted, as vLLM's HF throughput backend does,
so padding and over-generation are HF's cost, not its credit.
"""

from __future__ import annotations

import time

from quantlab.engine.bench_workload import BenchError, BenchRequest


def run_hf(model_path: str, reqs: list[BenchRequest], batch_size: int, device: str, dtype: str,
           progress: bool) -> dict:
    """Throughput of transformers generate over `reqs`; returns the same throughput keys as `summarize`."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                   "fp32": torch.float32, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise BenchError(f"the HF baseline cannot run in dtype {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    except (OSError, ValueError, ImportError) as e:
        raise BenchError(f"the HF baseline cannot load {model_path} ({str(e).splitlines()[0]}); name the float "
                         "model with --hf-model") from None
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else (pad[0] if isinstance(pad, list) else pad)
    batches = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
    in_tokens = out_tokens = 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=f"hf generate b={batch_size}", unit="batch", disable=not progress, leave=False):
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)
        in_tokens += sum(len(r.prompt_token_ids) for r in batch)
        out_tokens += sum(r.output_len for r in batch)
    sync()
    duration = time.perf_counter() - t0
    return {"completed": len(reqs), "duration_s": duration, "requests_per_s": len(reqs) / duration,
            "output_tok_per_s": out_tokens / duration, "total_tok_per_s": (in_tokens + out_tokens) / duration,
            "input_tokens": in_tokens, "output_tokens": out_tokens, "batch_size": batch_size}
