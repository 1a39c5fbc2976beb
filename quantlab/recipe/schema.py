"""The recipe as typed, frozen dataclasses. ``quantlab.recipe.load`` is the only code that sees raw
YAML: it validates every key once and hands these objects to the rest of quantlab, which trusts them.

The stage (algorithm) is kept apart from the scheme (format and granularity), so AWQ composes with INT4
or MXFP4 without a new class. Algorithm parameters are dataclasses next to each algorithm
(``quantlab.algorithms``); a ``Stage`` carries one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WeightScheme:
    """How a Linear's weight is quantized.

    Attributes:
        format: a key of ``quantlab.formats.FORMATS``.
        granularity: ``"tensor"``, ``"channel"`` (one scale per output row) or ``"group"``.
        group_size: group length along the input dimension when granularity is ``"group"`` (32, 64 or
            128 for int formats; the format's block, 16 or 32, for nvfp4/mxfp4), else None.
        observer: how the range is chosen: ``"minmax"``, ``"mse"`` (search shrink factors of the
            min-max range minimizing squared error) or ``"percentile"``.
        percentile: for ``observer: percentile``, the range is each group's (100 - p)th to pth
            percentile of the values.
    """

    format: str
    granularity: str
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 99.9


@dataclass(frozen=True, slots=True)
class ActivationScheme:
    """How a Linear's input activations are quantized at run time.

    Attributes:
        format: a key of ``FORMATS`` (``fp8_e4m3``, ``int8``, ``nvfp4``, ``mxfp4``).
        granularity: ``"token"`` (one scale per token, always dynamic), ``"tensor"`` (one scale) or
            ``"group"`` (fp4 microblocks, dynamic per block).
        dynamic: scales computed from each batch at run time (True) or calibrated once (False). A static
            ``"tensor"`` scheme stores ``input_scale``; nvfp4 activations are dynamic per block but keep a
            calibrated global scale (``input_global_scale``), as vLLM expects.
        observer: for calibrated ranges, ``"minmax"`` or ``"percentile"`` (the largest per-batch
            percentile of |x| over the calibration batches).
        percentile: for ``observer: percentile``.
    """

    format: str
    granularity: str
    dynamic: bool
    observer: str = "minmax"
    percentile: float = 99.99


@dataclass(frozen=True, slots=True)
class SchemeGroup:
    """A scheme and the modules it applies to.

    Attributes:
        targets: module class names (``"Linear"``) or ``"re:<regex>"`` matched (``re.fullmatch``)
            against module names such as ``model.layers.0.mlp.down_proj``. The first group whose
            targets match a module gives its scheme.
        weights: the weight scheme.
        activations: the input-activation scheme, or None for weight-only (W4A16, NVFP4A16 ...).
    """

    targets: tuple[str, ...]
    weights: WeightScheme
    activations: ActivationScheme | None = None


@dataclass(frozen=True, slots=True)
class KVCacheScheme:
    """FP8 KV cache: calibrated k/v scales, per tensor or per KV head."""

    format: str = "fp8_e4m3"
    granularity: str = "tensor"  # "tensor" | "head"


@dataclass(frozen=True, slots=True)
class Stage:
    """One algorithm in the ordered stage list: a transform (smoothquant, awq) or a rounder (rtn, gptq).

    Attributes:
        algorithm: a key of ``quantlab.recipe.stages.ALGORITHMS``.
        params: that algorithm's parameter dataclass instance.
    """

    algorithm: str
    params: Any


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """Where calibration text comes from and how much of it is used.

    Attributes:
        dataset: a text/JSONL file path, or ``"self-generated"`` (text sampled from the model itself).
        num_samples: number of sequences.
        seq_len: tokens per sequence.
        seed: seed of the deterministic shuffle (and of sampling for ``self-generated``).
        text_field: JSONL field holding the text.
    """

    dataset: str = "calib_data/gpl-3.txt"
    num_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    text_field: str = "text"


@dataclass(frozen=True, slots=True)
class Gates:
    """Promotion gates; a None gate is not checked."""

    max_ppl_increase_pct: float | None = None
    min_task_recovery_pct: float | None = None
    max_kl: float | None = None
    min_top1_agreement: float | None = None


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How ``quantlab eval`` measures a checkpoint against its original model.

    Attributes:
        dataset: held-out text (never the calibration text).
        context_len, stride, max_tokens: sliding-window perplexity settings.
        tasks: lm-eval task names (the offline ones under evaluation/tasks/ work without a network).
        limit: lm-eval examples per task (None = all).
        seed: lm-eval seed.
        gates: promotion gates.
    """

    dataset: str = "calib_data/heldout/apache-2.0.txt"
    context_len: int = 512
    stride: int = 256
    max_tokens: int = 4096
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    seed: int = 1234
    gates: Gates = field(default_factory=Gates)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """Engine build options (``quantlab build`` flags override them); baked into the engine.

    Attributes:
        max_batch_size: most sequences in one step (CUDA graphs are captured up to it).
        max_seq_len: most tokens of one sequence, prompt plus output (the rope table and block tables).
        max_num_tokens: most tokens computed in one step: the chunked-prefill budget.
        tokens_per_block: tokens in one KV-cache block.
        kv_cache_dtype: ``auto`` (FP8 E4M3 when the checkpoint has an FP8 KV scheme, else the compute
            dtype), ``bf16`` (the compute dtype) or ``fp8_e4m3`` (the checkpoint's k/v scales, or 1.0).
        dtype: compute dtype of activations and unquantized weights.
        device: the target, ``auto`` (CUDA when present), ``cuda`` or ``cpu``.
    """

    max_batch_size: int = 64
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    tokens_per_block: int = 16
    kv_cache_dtype: str = "auto"
    dtype: str = "bfloat16"
    device: str = "auto"


@dataclass(frozen=True, slots=True)
class Recipe:
    """A whole, validated recipe.

    Attributes:
        path: the recipe file as given (for messages); text and sha256 of its bytes go into
            quantlab.json so a checkpoint names the exact recipe that made it.
        model: ``smollm2-135m`` (the embedded default), a local HF directory, or a hub id.
        output: checkpoint directory.
        dtype: calibration dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``,
            ``bfloat16`` or ``float16``.
        export_dtype: dtype of unquantized tensors in the checkpoint (embeddings, norms, lm_head).
        trust_remote_code: passed to transformers; off unless the recipe turns it on.
        ignore: module names or ``re:`` patterns never quantized (lm_head by default).
        schemes: scheme groups, first match wins.
        kv_cache: FP8 KV-cache scheme, or None.
        stages: transforms first, then exactly one rounder.
    """

    path: str
    text: str
    sha256: str
    model: str
    output: str
    calibration: CalibrationConfig
    schemes: tuple[SchemeGroup, ...]
    stages: tuple[Stage, ...]
    ignore: tuple[str, ...] = ("lm_head",)
    kv_cache: KVCacheScheme | None = None
    dtype: str = "auto"
    export_dtype: str = "bfloat16"
    trust_remote_code: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    build: BuildOptions = field(default_factory=BuildOptions)
