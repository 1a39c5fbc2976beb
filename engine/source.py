"""What ``quantlab build`` reads: a quantlab checkpoint (through ``quantlab.checkpoint.stream`` only) or an
unquantized model directory (through ``safe_open``), one tensor or module at a time, plus the model's shape.

Both sources answer the same questions (a plain tensor, a linear layer, the KV scales of a layer), so the
builder has one code path. Only the Llama family is accepted: every other architecture is refused here,
by name, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlab.checkpoint.digest import checkpoint_digest
from quantlab.checkpoint.stream import StoredLinear, is_checkpoint, open_checkpoint
from quantlab.errors import CheckpointError

from .config import EngineError, ModelShape

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# RoPE variants whose table depends on the position only (``dynamic`` rescales with the sequence length).
ROPE_TYPES = ("default", "linear", "llama3")


class ModelSource:
    """An unquantized HF model directory of safetensors files."""

    kind = "model"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.config = json.loads((path / "config.json").read_text())
        self._file_of: dict[str, Path] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no safetensors weights (quantlab never reads pickled weights)")
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                self._file_of.update(dict.fromkeys(sf.keys(), f))
        self.kv_scheme = None

    def digest(self) -> str:
        return checkpoint_digest(self.path)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: the model has no tensor {name}")
        with safe_open(str(self._file_of[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    def linear(self, module: str) -> tuple[torch.Tensor | StoredLinear, torch.Tensor | None]:
        """(float weight [out, in], bias or None)."""
        bias = f"{module}.bias"
        return self.tensor(f"{module}.weight"), self.tensor(bias) if self.has(bias) else None

    def kv_scales(self, attention: str) -> None:
        return None


class CheckpointSource:
    """A quantlab checkpoint, read module by module through ``quantlab.checkpoint.stream``."""

    kind = "checkpoint"

    def __init__(self, path: Path):
        self.path = path
        self.ckpt = open_checkpoint(path)
        self.config = self.ckpt.config
        self.kv_scheme = self.ckpt.kv_cache
        self._quantized = self.ckpt.quantized_modules()
        self._names = set(self.ckpt.names())

    def digest(self) -> str:
        return checkpoint_digest(self.path)

    def has(self, name: str) -> bool:
        return name in self._names

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(name)

    def linear(self, module: str) -> tuple[torch.Tensor | StoredLinear, torch.Tensor | None]:
        """(StoredLinear, None) for a quantized module (it carries its bias), else (float weight, bias)."""
        if module in self._quantized:
            return self.ckpt.linear(module), None
        bias = f"{module}.bias"
        return self.tensor(f"{module}.weight"), self.tensor(bias) if self.has(bias) else None

    def is_quantized(self, module: str) -> bool:
        return module in self._quantized

    def kv_scales(self, attention: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.kv_scheme is None else self.ckpt.kv_scales(attention)


def open_source(source: str) -> ModelSource | CheckpointSource:
    """A checkpoint directory, a local model directory, or the embedded default model's name."""
    from quantlab.models import resolve_model

    if is_checkpoint(source):
        return CheckpointSource(Path(source))
    path = Path(resolve_model(source))
    if not path.is_dir():
        raise CheckpointError(f"{source} is neither a quantlab checkpoint nor a local model directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model directory {path} has no config.json")
    return ModelSource(path)


def hf_config(config: dict):
    """The transformers config object of a config.json dict (no remote code)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    return AutoConfig.for_model(config["model_type"], **cfg)


def model_shape(config: dict, max_seq_len: int) -> ModelShape:
    """The decoder's shape; EngineError naming the architecture or setting the engine cannot run."""
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise EngineError(f"architecture {arch} is not supported by the engine (supported: {', '.join(ARCHITECTURES)})")
    hf = hf_config(config)
    rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise EngineError(f"{arch} with rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window is not None and max_seq_len > window:
        raise EngineError(f"max_seq_len {max_seq_len} exceeds the model's sliding window {window}, "
                          "which the engine does not implement; build with --max-seq-len at most that")
    if max_seq_len > hf.max_position_embeddings:
        raise EngineError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                          f"{hf.max_position_embeddings}")
    if hf.hidden_act != "silu":
        raise EngineError(f"{arch} with hidden_act {hf.hidden_act!r} is not supported (the engine runs SwiGLU)")
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    heads = hf.num_attention_heads
    return ModelShape(architecture=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
                      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
                      rms_norm_eps=float(hf.rms_norm_eps), tie_word_embeddings=bool(hf.tie_word_embeddings),
                      bos_token_id=hf.bos_token_id, eos_token_ids=tuple(e for e in eos if e is not None))


def rope_table(config: dict, max_seq_len: int) -> torch.Tensor:
    """[max_seq_len, head_dim] float32, cos | sin halves, from transformers' own rotary embedding (so every
    scaling variant is computed once, by the code the reference model runs)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(config)
    rotary = LlamaRotaryEmbedding(hf)
    positions = torch.arange(max_seq_len).unsqueeze(0)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1).float().contiguous()
