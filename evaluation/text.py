"""The held-out evaluation text: which files, and their documents as token ids.

A relative ``eval.dataset`` is found the way calibration data is, through ``quantlab.data``'s one
resolver (the current directory, then quantlab's bundled data), never by this file's position in a
source tree, so an installed wheel finds its bundled held-out text or says where to point instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.data import DATA_ROOT, digest, load_texts, resolve_data_path
from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class EvalTokens:
    """Tokenized held-out documents.

    Attributes:
        docs: one int64 1-D tensor of token ids per document, in order, cut to the token budget.
        names: a label per document (``file`` or ``file#row``).
        digest: sha256 of all token ids in order (``quantlab.data.digest``), so reports can be matched.
    """

    docs: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    digest: str

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.docs)


def dataset_files(path: str) -> list[Path]:
    """The held-out file, or every .txt/.jsonl file of a directory in name order.

    A file is resolved by ``quantlab.data.resolve_data_path``; a directory is looked up the same two
    ways, as given and under ``quantlab.data.DATA_ROOT`` (the bundled data).
    """
    for d in (Path(path).expanduser(), DATA_ROOT / path):
        if d.is_dir():
            files = sorted(f for f in d.iterdir() if f.suffix in (".txt", ".jsonl"))
            if not files:
                raise QuantlabError(f"evaluation directory {d} holds no .txt or .jsonl file")
            return files
    try:
        return [resolve_data_path(path)]
    except QuantlabError as e:
        raise QuantlabError(f"eval.dataset: {e}") from None


def load_eval_tokens(path: str, tokenizer, max_tokens: int | None, text_field: str = "text") -> EvalTokens:
    """Tokenize held-out documents in order until ``max_tokens`` tokens are taken (the last document is
    cut to fit; None = all). Each document is tokenized on its own with the tokenizer's usual special
    tokens (a BOS where the model expects one, which is then context, never scored)."""
    docs, names, total = [], [], 0
    for f in dataset_files(path):
        if max_tokens is not None and total >= max_tokens:
            break
        texts = load_texts(str(f), text_field)
        for i, text in enumerate(texts):
            if max_tokens is not None and total >= max_tokens:
                break
            ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            if len(ids) < 2:
                continue  # nothing to predict
            docs.append(ids)
            names.append(f.name if len(texts) == 1 else f"{f.name}#{i}")
            total += len(ids)
    if not docs:
        raise QuantlabError(f"the evaluation text {path} holds no document of two or more tokens")
    return EvalTokens(tuple(docs), tuple(names), digest(torch.cat(docs)))
