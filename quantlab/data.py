"""Calibration sets: read text files through ``datasets``, tokenize, cut fixed-length windows, shuffle
deterministically, and fingerprint the exact tokens used.

Windowing rule (shared with the peer benchmark, so both tools see the same samples): the documents are
joined with a blank line, tokenized once without special tokens, and cut into consecutive
non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped). The windows
are shuffled with ``torch.Generator().manual_seed(seed)`` and the first ``num_samples`` are taken; when
the text holds fewer windows than asked for, the shuffled list is repeated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuantlabError
from .recipe.schema import CalibrationConfig

SELF_GENERATED = "self-generated"
_PACKAGE = Path(__file__).resolve().parent
# Where a relative data path such as the recipes' default ``calib_data/gpl-3.txt`` resolves when it is not
# found from the current directory: the installed package (a wheel ships calib_data/ inside quantlab/,
# see setup.py) or, for a source checkout, the repository root that holds calib_data/.
DATA_ROOT = _PACKAGE if (_PACKAGE / "calib_data").is_dir() else _PACKAGE.parent


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration.

    Attributes:
        input_ids: int64 [num_samples, seq_len].
        source: where the text came from (a resolved path, or ``self-generated``).
        digest: sha256 of the token ids (little-endian int64 bytes); quantlab.json records it so two
            checkpoints can be told apart by their calibration data.
    """

    input_ids: torch.Tensor
    source: str
    digest: str


def resolve_data_path(path: str) -> Path:
    """A data file path as given, relative to the current directory or else to ``DATA_ROOT``."""
    p = Path(path).expanduser()
    for candidate in (p, DATA_ROOT / p):
        if candidate.is_file():
            return candidate
    raise QuantlabError(f"data file {path} not found in {Path.cwd()} nor in quantlab's bundled data ({DATA_ROOT}); "
                        "point the recipe's dataset at an existing text or JSONL file")


def load_texts(path: str, text_field: str = "text") -> list[str]:
    """Documents of a .txt file (the whole file is one document) or a .jsonl/.json file (one per row)."""
    import datasets

    resolved = resolve_data_path(path)
    datasets.disable_progress_bars()
    if resolved.suffix in (".jsonl", ".json"):
        ds = datasets.load_dataset("json", data_files=str(resolved), split="train")
        if text_field not in ds.column_names:
            raise QuantlabError(f"{resolved} has no field {text_field!r} (fields: {', '.join(ds.column_names)})")
        return [t for t in ds[text_field] if t]
    ds = datasets.load_dataset("text", data_files=str(resolved), split="train", sample_by="document")
    return [t for t in ds["text"] if t]


def token_windows(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len] of the joined, tokenized documents."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise QuantlabError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def digest(input_ids: torch.Tensor) -> str:
    """sha256 of token ids."""
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _self_generated(cfg: CalibrationConfig, model, tokenizer) -> torch.Tensor:
    """Sample calibration text from the model itself (data-free calibration, as in LLM-QAT / GPTQ-free
    setups): each sequence starts from one random vocabulary token and is sampled at temperature 1."""
    g = torch.Generator().manual_seed(cfg.seed)
    start = torch.randint(0, tokenizer.vocab_size, (cfg.num_samples, 1), generator=g)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(
            start.to(model.device), attention_mask=torch.ones_like(start).to(model.device),
            do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            min_new_tokens=cfg.seq_len - 1, max_new_tokens=cfg.seq_len - 1,
            pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0,
        )
    return out[:, : cfg.seq_len].cpu()


def build_calibration_set(cfg: CalibrationConfig, tokenizer, model=None) -> CalibrationSet:
    """The calibration windows a recipe asks for; ``model`` is needed only for ``self-generated``."""
    if cfg.dataset == SELF_GENERATED:
        ids = _self_generated(cfg, model, tokenizer)
        return CalibrationSet(ids, SELF_GENERATED, digest(ids))
    path = resolve_data_path(cfg.dataset)
    windows = token_windows(load_texts(str(path), cfg.text_field), tokenizer, cfg.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))
    repeats = -(-cfg.num_samples // len(windows))
    ids = windows[order.repeat(repeats)[: cfg.num_samples]]
    return CalibrationSet(ids, str(path), digest(ids))
