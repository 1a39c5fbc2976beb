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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.errors import QuantlabError

from .text import EvalTokens

ORIGINAL = "original"


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
        token_nll: per document, float32 [len(doc)]: the NLL of each token given the text before it
            (NaN for the document's first token, which is never scored).
        window_kl, window_top1: per window in text order (``windows``), the mean KL and the top-1
            agreement over that window's scored tokens: their spread shows whether damage is even or
            concentrated in a few passages.
    """

    perplexity: float
    nll: float
    num_scored: int
    doc_perplexity: tuple[float, ...]
    kl: float
    top1_agreement: float
    token_nll: tuple[torch.Tensor, ...]
    window_kl: tuple[float, ...]
    window_top1: tuple[float, ...]

    def doc_spread(self) -> dict[str, float]:
        """min / median / max / std of the per-document perplexities."""
        return spread(self.doc_perplexity)


def spread(values) -> dict[str, float]:
    """min / median / max / population std of a non-empty sequence of numbers."""
    v = list(values)
    return {"min": min(v), "median": statistics.median(v), "max": max(v),
            "std": statistics.pstdev(v) if len(v) > 1 else 0.0}


class Reference:
    """The original model's log-probs at every scored position, row-aligned with the windows in text
    order (window i owns rows ``offset[i] : offset[i] + num_scored``), so the original need not run again
    for another checkpoint evaluated on the same tokens (``evaluation/reference.py`` keeps them on disk).

    Subclasses implement ``rows``; ``None`` from it means "not stored: run the model".
    """

    def rows(self, start: int, stop: int) -> torch.Tensor | None:
        """float32 [stop - start, vocab] log-probs of the original, or None."""
        return None

    def put(self, start: int, logp: torch.Tensor) -> None:
        """Take the original's freshly computed log-probs for rows ``start : start + len(logp)``."""


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
    *,
    reference: Reference | None = None,
    on_windows: Callable[[int], None] | None = None,
) -> dict[str, ModelScores]:
    """Score the original and each candidate over the same windows, in one loop: each batch of windows
    goes through every model before the next batch, so KL and top-1 agreement need no second pass.

    Args:
        original: the reference model; KL and top-1 agreement are measured against it.
        candidates: name -> model (quantized copies); a name may not be ``"original"``.
        tokens: from ``text.load_eval_tokens``.
        context_len, stride: window length and step, in tokens.
        batch_size: windows per forward pass. Only the scored positions' logits are kept, so memory is
            about batch_size x stride x vocab floats per model (context_len x vocab for first windows).
        reference: where the original's log-probs may already be stored (then the original does not
            run) and where freshly computed ones are handed (``Reference.put``).
        on_windows: called with the number of windows just finished, after each batch (progress).

    Returns:
        ``{"original": ModelScores, name: ModelScores, ...}``.
    """
    if ORIGINAL in candidates:
        raise QuantlabError(f"a candidate may not be called {ORIGINAL!r}")
    reference = reference or Reference()
    models = {ORIGINAL: original, **candidates}
    wins = windows([len(d) for d in tokens.docs], context_len, stride)
    offsets = [0]
    for w in wins:
        offsets.append(offsets[-1] + w.num_scored)
    # Similar lengths share a batch: little padding. Indices keep each window's text-order position.
    order = sorted(range(len(wins)), key=lambda i: -(wins[i].end - wins[i].start))
    token_nll = {m: [torch.full((len(d),), math.nan) for d in tokens.docs] for m in models}
    window_kl = {m: [0.0] * len(wins) for m in models}
    window_top1 = {m: [1.0] * len(wins) for m in models}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = [wins[i] for i in idx]
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
        rows, pos, tgt = torch.cat(sel_rows), torch.cat(sel_pos), torch.cat(targets)
        cuts = torch.tensor([0] + [w.num_scored for w in batch]).cumsum(0).tolist()
        ref = None
        for name, model in models.items():
            if name == ORIGINAL:
                stored = [reference.rows(offsets[i], offsets[i] + wins[i].num_scored) for i in idx]
                if all(s is not None for s in stored):
                    logp = torch.cat(stored)
                else:
                    logp = _log_probs(model, ids, mask, rows, pos)
                    for i, a, z in zip(idx, cuts, cuts[1:]):
                        reference.put(offsets[i], logp[a:z])
            else:
                logp = _log_probs(model, ids, mask, rows, pos)  # [num_scored_in_batch, vocab]
            nll = -logp.gather(1, tgt[:, None]).squeeze(1)
            if ref is None:
                ref, kl, agree = logp, torch.zeros_like(nll), torch.ones_like(nll)
            elif logp.shape[-1] != ref.shape[-1]:
                raise QuantlabError(f"{name} predicts over {logp.shape[-1]} tokens but the original over "
                                    f"{ref.shape[-1]}: they do not share a vocabulary")
            else:
                kl = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1)
                agree = (logp.argmax(-1) == ref.argmax(-1)).float()
            for i, w, a, z in zip(idx, batch, cuts, cuts[1:]):
                token_nll[name][w.doc][w.end - w.num_scored : w.end] = nll[a:z]
                window_kl[name][i] = kl[a:z].double().mean().item()
                window_top1[name][i] = agree[a:z].double().mean().item()
            del logp
        if on_windows is not None:
            on_windows(len(batch))
    return {name: _summarize(token_nll[name], window_kl[name], window_top1[name], wins) for name in models}


def _summarize(token_nll: list[torch.Tensor], window_kl: list[float], window_top1: list[float],
               wins: list[Window]) -> ModelScores:
    """Totals from per-token NLLs and per-window means (weighted back by each window's scored tokens).
    The scored positions come from the windows, not from NaN tests, so a NaN the model produced stays
    in the result."""
    masks = [torch.zeros(len(t), dtype=torch.bool) for t in token_nll]
    for w in wins:
        masks[w.doc][w.end - w.num_scored : w.end] = True
    scored = [t[m].double() for t, m in zip(token_nll, masks)]
    total = sum(len(t) for t in scored)
    nll = sum(t.sum().item() for t in scored) / total
    weights = [w.num_scored for w in wins]
    return ModelScores(
        perplexity=math.exp(nll),
        nll=nll,
        num_scored=total,
        doc_perplexity=tuple(math.exp(t.mean().item()) for t in scored),
        kl=sum(k * n for k, n in zip(window_kl, weights)) / total,
        top1_agreement=sum(a * n for a, n in zip(window_top1, weights)) / total,
        token_nll=tuple(token_nll),
        window_kl=tuple(window_kl),
        window_top1=tuple(window_top1),
    )
