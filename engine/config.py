"""What an engine is (``EngineConfig``, saved as engine.json) and how one load runs it (``RuntimeOptions``).

``EngineConfig`` is written once by ``quantlab build`` and trusted by the runtime after the manifest check:
the model's shape, the limits baked in at build (CUDA graphs, block tables and the rope table are sized by
them), the ``LinearSpec`` of every linear, the KV-cache dtype, and the target and versions that pin it.
``RuntimeOptions`` holds what may change from one load to the next without a rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from quantlab.errors import QuantlabError

from .kernels.linear import LinearSpec
from .scheduler import POLICIES

ENGINE_JSON = "engine.json"
ENGINE_FORMAT_VERSION = 1
KV_CACHE_DTYPES = ("auto", "bf16", "fp8_e4m3")
DTYPES = ("bfloat16", "float16", "float32")


class EngineError(QuantlabError):
    """An engine directory is missing, altered, or built for another machine (one sentence, exit 2)."""


@dataclass(frozen=True)
class ModelShape:
    """The decoder's shape, read from the source's config.json at build.

    Attributes:
        architecture: the transformers class name (``LlamaForCausalLM`` ...), for messages and docs.
        head_dim: per-head width (``config.head_dim`` or hidden / heads).
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: the output projection reuses the input embedding.
        eos_token_ids: every id that ends generation (config.json's ``eos_token_id`` may be a list).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BuildLimits:
    """Limits fixed at build: every buffer the runtime preallocates is sized by them."""

    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    tokens_per_block: int


@dataclass(frozen=True)
class EngineConfig:
    """The content of engine.json.

    Attributes:
        model: the decoder's shape.
        limits: the baked limits.
        dtype: compute dtype of activations and unquantized weights (a name in ``DTYPES``).
        kv_cache_dtype: ``bf16`` (the compute dtype) or ``fp8_e4m3``.
        kv_scales: where FP8 k/v scales came from: ``checkpoint`` or ``unit`` (1.0); None for a BF16 cache.
        linears: ``LinearSpec`` per stored linear (``layers.3.qkv_proj``, or unfused ``layers.3.q_proj`` ...).
        target: ``{"device": "cpu"|"cuda", "compute_capability": "9.0"|"cpu"}``.
        versions: torch, triton and quantlab versions the engine was built with.
        source: ``{"kind": "checkpoint"|"model", "path", "digest"}``.
        skip_gates: built from a quantized checkpoint without a passing evaluation (``--skip-gates``).
        fusion: how fused projections were laid out and why (notes per unfused group, for humans).
    """

    model: ModelShape
    limits: BuildLimits
    dtype: str
    kv_cache_dtype: str
    kv_scales: str | None
    linears: dict[str, LinearSpec]
    target: dict[str, str]
    versions: dict[str, str]
    source: dict[str, str]
    skip_gates: bool = False
    fusion: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["format_version"] = ENGINE_FORMAT_VERSION
        d["linears"] = {k: v.to_json() for k, v in self.linears.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EngineConfig":
        if d.get("format_version") != ENGINE_FORMAT_VERSION:
            raise EngineError(f"engine.json has format version {d.get('format_version')!r}, this quantlab reads "
                              f"{ENGINE_FORMAT_VERSION}; rebuild the engine")
        model = dict(d["model"])
        model["eos_token_ids"] = tuple(model["eos_token_ids"])
        return cls(model=ModelShape(**model), limits=BuildLimits(**d["limits"]), dtype=d["dtype"],
                   kv_cache_dtype=d["kv_cache_dtype"], kv_scales=d["kv_scales"],
                   linears={k: LinearSpec.from_json(v) for k, v in d["linears"].items()}, target=d["target"],
                   versions=d["versions"], source=d["source"], skip_gates=d["skip_gates"], fusion=d.get("fusion", {}))

    def save(self, directory: Path) -> None:
        (directory / ENGINE_JSON).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "EngineConfig":
        path = Path(directory) / ENGINE_JSON
        if not path.is_file():
            raise EngineError(f"{directory} is not an engine directory (no {ENGINE_JSON}); build one with quantlab build")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path} is not a valid engine description ({e}); rebuild the engine") from None


@dataclass(frozen=True)
class RuntimeOptions:
    """Per-load settings that need no rebuild.

    Attributes:
        kv_cache_memory_fraction: share of the GPU memory left after weights and the activation peak that
            the KV pool takes.
        kv_cache_mib: a fixed KV pool size on any device, in place of the fraction (to compare KV dtypes at
            one memory budget, or to leave room for another process); on CUDA it must fit in the memory left
            after the weights and the activation peak. None: the fraction on CUDA; on the CPU, where there is
            no free-memory query worth trusting, 64 MiB raised to what one sequence of ``max_seq_len`` tokens
            needs (so a default load never fails for want of room, e.g. a float32 engine's KV at 2048).
        enforce_eager: skip CUDA-graph capture (debugging; slower decode).
        policy: scheduler admission policy (``POLICIES``).
        enable_prefix_caching: reuse full KV blocks of identical prefixes.
        max_batch_size, max_num_tokens: lower the baked limits for this load (never raise them).
    """

    kv_cache_memory_fraction: float = 0.9
    kv_cache_mib: float | None = None
    enforce_eager: bool = False
    policy: str = "guaranteed_no_evict"
    enable_prefix_caching: bool = True
    max_batch_size: int | None = None
    max_num_tokens: int | None = None

    def __post_init__(self):
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise EngineError(f"kv_cache_memory_fraction must be in (0, 1] (got {self.kv_cache_memory_fraction})")
        if self.kv_cache_mib is not None and not self.kv_cache_mib > 0:
            raise EngineError(f"kv_cache_mib must be positive (got {self.kv_cache_mib})")
        if self.policy not in POLICIES:
            raise EngineError(f"policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")

    @classmethod
    def from_overrides(cls, overrides: dict) -> "RuntimeOptions":
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise EngineError(f"unknown engine option {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return replace(cls(), **overrides)

    def limits(self, baked: BuildLimits) -> BuildLimits:
        """The limits of this load: the baked ones, lowered where asked."""
        for name in ("max_batch_size", "max_num_tokens"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= getattr(baked, name):
                raise EngineError(f"{name} must be between 1 and the engine's {getattr(baked, name)} (got {v}); "
                                  "rebuild the engine to raise it")
        return replace(baked, max_batch_size=self.max_batch_size or baked.max_batch_size,
                       max_num_tokens=self.max_num_tokens or baked.max_num_tokens)
