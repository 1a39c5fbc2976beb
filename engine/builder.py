"""``quantlab build``: compile a checkpoint or an unquantized model into an engine directory.

All the work the runtime must not repeat happens here: q/k/v and gate/up fusion (``layout.fuse``),
each linear packed by ``kernels.linear.pack`` for its kernel (and, on a CUDA target, its launch choices
measured by ``kernels.linear.tune``), unquantized tensors cast to the compute
dtype, the RoPE table (with the model's scaling) and the FP8 KV scales computed. The source is read one
tensor/module at a time and the weights are written in shards of at most ``SHARD_BYTES``, so a model larger
than host memory builds. Everything lands in a temporary directory renamed into place (quantlab.atomic).
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from quantlab.atomic import atomic_directory
from quantlab.recipe.schema import BuildOptions

from .config import BuildLimits, EngineConfig, EngineError
from .kernels.linear import LinearSpec, pack, tune
from .layout import fuse
from .manifest import current_target, current_versions, write_manifest
from .model import FUSED
from .promotion import check_promotion
from .source import CheckpointSource, model_shape, open_source, rope_table

# Load hashes every file for the manifest check, concurrently, but one file's SHA-256 is sequential: the
# largest shard bounds that time. 2 GiB (as checkpoint shards, and HF's) keeps it short on a many-core host.
SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class BuildSummary:
    path: Path
    config: EngineConfig
    bytes: int
    seconds: float


class _ShardWriter:
    """Collects tensors and writes a safetensors shard whenever ``SHARD_BYTES`` would be exceeded."""

    def __init__(self, directory: Path):
        self.directory, self.pending, self.size, self.shards = directory, {}, 0, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > SHARD_BYTES:
            self.flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f"weights-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(path))
        self.shards.append(path)
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0].rename(self.directory / "weights.safetensors")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA device is available to build for")
    return name


def _kv_dtype(option: str, source) -> str:
    if option == "auto":
        return "fp8_e4m3" if source.kv_scheme is not None else "bf16"
    if source.kv_scheme is not None and option == "bf16":
        warnings.warn("the checkpoint was calibrated with an FP8 KV cache; this engine keeps K/V unquantized",
                      stacklevel=3)
    return option


def _pack(weight, bias, dtype, device: str) -> tuple[LinearSpec, dict[str, torch.Tensor]]:
    """``kernels.linear.pack``, plus the launch choices ``kernels.linear.tune`` measures on a CUDA target."""
    spec, tensors = pack(weight, dtype, bias)
    if device == "cuda":
        config = tune(spec, {k: t.to(device) for k, t in tensors.items()})
        if config is not None:
            spec = replace(spec, kernel_config=config)
    return spec, tensors


def _projection(source, writer: _ShardWriter, specs: dict, fusion: dict, dtype, device: str, layer: str, hf: str,
                name: str):
    """Write one (possibly fused) projection of ``layer`` (engine name) read from ``hf`` (source prefix)."""
    parts = [f"{hf}.{p}" for p in FUSED.get(name, (name,))]
    read = [source.linear(p) for p in parts]
    fused, why = fuse(read) if len(read) > 1 else (read[0], "")
    groups = [(f"{layer}.{name}", fused)] if fused is not None else \
        [(f"{layer}.{p}", r) for p, r in zip(FUSED[name], read)]
    if fused is None:
        fusion[f"{layer}.{name}"] = f"stored unfused: {why}"
    for engine_name, (weight, bias) in groups:
        spec, tensors = _pack(weight, bias, dtype, device)
        specs[engine_name] = spec
        for local, t in tensors.items():
            writer.add(f"{engine_name}.{local}", t)


def build_engine(source: str, output: str | Path, options: BuildOptions, *, overwrite: bool = False,
                 skip_gates: bool = False, sign_key: str | Path | None = None) -> BuildSummary:
    """Build ``source`` into the engine directory ``output``.

    Raises:
        PromotionError: a quantized checkpoint without a passing report of its digest (unless skip_gates).
        EngineError / CheckpointError: an unsupported model or an unreadable source, in one sentence.
    """
    start = time.perf_counter()
    src = open_source(source)
    digest = src.digest()
    if isinstance(src, CheckpointSource) and not skip_gates:
        check_promotion(src.path, digest)
    shape = model_shape(src.config, options.max_seq_len)
    device, dtype = _device(options.device), _DTYPES[options.dtype]
    kv_dtype = _kv_dtype(options.kv_cache_dtype, src)
    specs: dict[str, LinearSpec] = {}
    fusion: dict[str, str] = {}
    kv_scales = None
    with atomic_directory(output, overwrite, "engine directory ", EngineError) as tmp:
        w = _ShardWriter(tmp)
        w.add("embed_tokens.weight", src.tensor("model.embed_tokens.weight").to(dtype))
        w.add("rope.cos_sin", rope_table(src.config, options.max_seq_len))
        for i in range(shape.num_layers):
            layer, hf = f"layers.{i}", f"model.layers.{i}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                w.add(f"{layer}.{norm}.weight", src.tensor(f"{hf}.{norm}.weight").to(dtype))
            for name in ("qkv_proj", "o_proj"):
                _projection(src, w, specs, fusion, dtype, device, layer, f"{hf}.self_attn", name)
            for name in ("gate_up_proj", "down_proj"):
                _projection(src, w, specs, fusion, dtype, device, layer, f"{hf}.mlp", name)
            if kv_dtype == "fp8_e4m3":
                scales = src.kv_scales(f"{hf}.self_attn")
                kv_scales = "checkpoint" if scales is not None else "unit"
                k, v = scales if scales is not None else (torch.ones(1), torch.ones(1))
                w.add(f"{layer}.k_scale", k.float())
                w.add(f"{layer}.v_scale", v.float())
        w.add("norm.weight", src.tensor("model.norm.weight").to(dtype))
        quantized_head = isinstance(src, CheckpointSource) and src.is_quantized("lm_head")
        if quantized_head or not shape.tie_word_embeddings:
            shape = shape if not quantized_head else _untied(shape)
            weight, bias = src.linear("lm_head")
            spec, tensors = _pack(weight, bias, dtype, device)
            specs["lm_head"] = spec
            for local, t in tensors.items():
                w.add(f"lm_head.{local}", t)
        w.close()
        if kv_scales == "unit":
            warnings.warn("FP8 KV cache without calibrated scales: k/v scales are 1.0 (calibrate with a "
                          "kv_cache scheme for accurate FP8 attention)", stacklevel=2)
        for name in TOKENIZER_FILES:
            if (src.path / name).is_file():
                shutil.copy2(src.path / name, tmp / name)
        config = EngineConfig(model=shape, limits=BuildLimits(options.max_batch_size, options.max_seq_len,
                                                              options.max_num_tokens, options.tokens_per_block),
                              dtype=options.dtype, kv_cache_dtype=kv_dtype, kv_scales=kv_scales, linears=specs,
                              target=current_target(device), versions=current_versions(),
                              source={"kind": src.kind, "path": str(src.path), "digest": digest},
                              skip_gates=skip_gates and isinstance(src, CheckpointSource), fusion=fusion)
        config.save(tmp)
        write_manifest(tmp, sign_key)
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return BuildSummary(Path(output), config, size, time.perf_counter() - start)


def _untied(shape):
    return replace(shape, tie_word_embeddings=False)
