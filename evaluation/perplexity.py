"""Sliding-window perplexity of an original model and its quantized copies, over the same token windows
in one pass, with the distribution-level damage measures perplexity alone hides.

Windowing follows the Hugging Face perplexity guide (``docs/transformers/perplexity``): within each
document, windows of ``context_len`` tokens start every ``stride`` tokens, and each window scores only
the tokens the previous window did not. With ``stride < context_len`` every token but the document's
first is scored exactly once, with at least ``context_len - stride`` tokens of context; with
``stride == context_len`` (non-overlapping windows) each window's first token has no prediction and is
not scored. Documents (a .txt file, or one JSONL row) are windowed separately, which is what gives a
per-document spread.

Per scored token and model, in float32 (``log_softmax`` of the logits): the negative log-likelihood of
the true token; for each quantized model the KL divergence KL(P_orig || P_quant) of the next-token
distributions, and whether the argmax agrees with the original's. KL and top-1 agreement see damage
that averages out of perplexity (a model can lose confidence on some tokens and gain it on others).
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantlab.data import digest, load_texts, resolve_data_path
from quantlab.errors import QuantlabError

ORIGINAL = "original"
_REPO_ROOT = Path(__file__).resolve().parent.parent


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


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of document ``doc``; the last ``num_scored`` of them are scored."""

    doc: int
    start: int
    end: int
    num_scored: int


@dataclass(frozen=True)
class ModelScores:
    """One model's numbers over the scored tokens.

    Attributes:
        perplexity: exp(mean NLL) over all scored tokens (nats).
        nll: mean NLL per scored token (nats).
        num_scored: tokens scored.
        doc_perplexity: exp(mean NLL) per document, in document order.
        kl: mean KL(P_orig || P_this) in nats per token; 0 for the original itself.
        top1_agreement: fraction of scored tokens whose argmax equals the original's; 1 for the original.
    """

    perplexity: float
    nll: float
    num_scored: int
    doc_perplexity: tuple[float, ...]
    kl: float
    top1_agreement: float

    def doc_spread(self) -> dict[str, float]:
        """min / median / max / std of the per-document perplexities."""
        p = self.doc_perplexity
        return {"min": min(p), "median": statistics.median(p), "max": max(p),
                "std": statistics.pstdev(p) if len(p) > 1 else 0.0}


def dataset_files(path: str) -> list[Path]:
    """The held-out file, or every .txt/.jsonl file of a directory in name order (relative paths are
    tried against the current directory, then against quantlab's repository root)."""
    for d in (Path(path).expanduser(), _REPO_ROOT / path):
        if d.is_dir():
            files = sorted(f for f in d.iterdir() if f.suffix in (".txt", ".jsonl"))
            if not files:
                raise QuantlabError(f"evaluation directory {d} holds no .txt or .jsonl file")
            return files
    return [resolve_data_path(path)]


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


def windows(doc_lengths: list[int], context_len: int, stride: int) -> list[Window]:
    """Strided windows over each document; no token is scored twice (see the module docstring)."""
    if not 0 < stride <= context_len:
        raise QuantlabError(f"stride must be in 1..context_len={context_len} (got {stride})")
    out = []
    for d, n in enumerate(doc_lengths):
        prev_end = 0
        for start in range(0, n, stride):
            end = min(start + context_len, n)
            # The window's first token has no prediction; a first window therefore scores end - 1.
            out.append(Window(d, start, end, min(end - prev_end, end - start - 1)))
            prev_end = end
            if end == n:
                break
    return [w for w in out if w.num_scored > 0]


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """float32 next-token log-probs [len(rows), vocab] at positions ``pos`` of rows ``rows`` of a
    right-padded batch [batch, width]. Only the tail of positions the batch needs is turned into logits
    (``logits_to_keep``): the context positions of later windows never get vocab-sized logits."""
    device = next(model.parameters()).device
    keep = ids.shape[1] - int(pos.min())
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
    tail = logits[:, -keep:]
    picked = tail[rows.to(device), (pos - (ids.shape[1] - keep)).to(device)]
    return F.log_softmax(picked.float(), dim=-1).cpu()


@torch.no_grad()
def score(
    original: nn.Module,
    candidates: Mapping[str, nn.Module],
    tokens: EvalTokens,
    context_len: int,
    stride: int,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, ModelScores]:
    """Score the original and each candidate over the same windows, batch by batch.

    Args:
        original: the reference model; KL and top-1 agreement are measured against it.
        candidates: name -> model (quantized copies); a name may not be ``"original"``.
        tokens: from ``load_eval_tokens``.
        context_len, stride: window length and step, in tokens.
        batch_size: windows per forward pass. Only the scored positions' logits are kept, so memory is
            about batch_size x stride x vocab floats per model (context_len x vocab for first windows).

    Returns:
        ``{"original": ModelScores, name: ModelScores, ...}``.
    """
    if ORIGINAL in candidates:
        raise QuantlabError(f"a candidate may not be called {ORIGINAL!r}")
    models = {ORIGINAL: original, **candidates}
    wins = windows([len(d) for d in tokens.docs], context_len, stride)
    wins.sort(key=lambda w: -(w.end - w.start))  # similar lengths share a batch: little padding
    num_docs = len(tokens.docs)
    nll_sum = {m: [0.0] * num_docs for m in models}
    count = [0] * num_docs
    kl_sum = {m: 0.0 for m in models}
    agree = {m: 0 for m in models}
    for b in tqdm(range(0, len(wins), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = wins[b : b + batch_size]
        width = max(w.end - w.start for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, : w.end - w.start] = tokens.docs[w.doc][w.start : w.end]
            mask[r, : w.end - w.start] = 1
        # The scored targets of row r sit at [n_r - num_scored_r, n_r); each is predicted at the
        # position before it.
        sel_rows, sel_pos, targets = [], [], []
        for r, w in enumerate(batch):
            n = w.end - w.start
            pos = torch.arange(n - w.num_scored - 1, n - 1)
            sel_rows.append(torch.full_like(pos, r))
            sel_pos.append(pos)
            targets.append(ids[r, n - w.num_scored : n])
            count[w.doc] += w.num_scored
        rows, pos, tgt = torch.cat(sel_rows), torch.cat(sel_pos), torch.cat(targets)
        doc_of = torch.cat([torch.full((w.num_scored,), w.doc) for w in batch])
        ref = None
        for name, model in models.items():
            logp = _log_probs(model, ids, mask, rows, pos)  # [num_scored_in_batch, vocab]
            nll = -logp.gather(1, tgt[:, None]).squeeze(1)
            per_doc = torch.zeros(num_docs, dtype=torch.float64).index_add_(0, doc_of, nll.double())
            for d in doc_of.unique().tolist():
                nll_sum[name][d] += per_doc[d].item()
            if ref is None:
                ref = logp
            elif logp.shape[-1] != ref.shape[-1]:
                raise QuantlabError(f"{name} predicts over {logp.shape[-1]} tokens but the original over "
                                    f"{ref.shape[-1]}: they do not share a vocabulary")
            else:
                kl_sum[name] += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
                agree[name] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            del logp
    total = sum(count)
    out = {}
    for name in models:
        nll = sum(nll_sum[name]) / total
        out[name] = ModelScores(
            perplexity=math.exp(nll),
            nll=nll,
            num_scored=total,
            doc_perplexity=tuple(math.exp(s / c) for s, c in zip(nll_sum[name], count) if c),
            kl=kl_sum[name] / total,
            top1_agreement=1.0 if name == ORIGINAL else agree[name] / total,
        )
    return out
