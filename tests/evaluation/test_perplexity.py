"""Sliding-window perplexity, KL and top-1 agreement on a tiny random Llama (CPU, well under a second)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab.data import digest
from quantlab.evaluation.perplexity import ORIGINAL, score, windows
from quantlab.evaluation.text import EvalTokens

VOCAB = 97


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    docs = tuple(torch.randint(0, VOCAB, (n,), generator=g) for n in (70, 17, 2, 33))
    return EvalTokens(docs, ("a", "b", "c", "d"), digest(torch.cat(docs)))


def hf_guide_nll(model, ids: torch.Tensor, context_len: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, through the model's own loss: (sum of NLL, tokens)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_len, len(ids))
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += model(inp, labels=labels).loss.item() * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return total, count


def test_non_overlapping_windows_equal_exp_mean_nll(model, tokens):
    got = score(model, {}, tokens, context_len=8, stride=8, batch_size=3)[ORIGINAL]
    nll = []
    for doc in tokens.docs:  # naive: independent 8-token chunks, every token after a chunk's first
        for s in range(0, len(doc), 8):
            chunk = doc[s : s + 8]
            with torch.no_grad():
                logp = torch.log_softmax(model(chunk[None]).logits[0].float(), -1)
            nll += (-logp[:-1].gather(1, chunk[1:, None]).squeeze(1)).tolist()
    assert got.num_scored == len(nll)
    assert got.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@pytest.mark.parametrize("context_len, stride", [(16, 5), (16, 16), (32, 7), (100, 50)])
def test_strided_scoring_matches_hf_guide_loop(model, tokens, context_len, stride):
    got = score(model, {}, tokens, context_len, stride, batch_size=2)[ORIGINAL]
    sums = [hf_guide_nll(model, d, context_len, stride) for d in tokens.docs]
    assert got.num_scored == sum(c for _, c in sums)
    assert got.nll == pytest.approx(sum(s for s, _ in sums) / got.num_scored, rel=1e-5)
    assert got.doc_perplexity == pytest.approx([math.exp(s / c) for s, c in sums], rel=1e-5)


@pytest.mark.parametrize("context_len, stride", [(16, 5), (16, 15), (8, 1), (64, 32)])
def test_overlapping_windows_score_every_token_but_the_first_exactly_once(context_len, stride):
    lengths = [70, 17, 2, 33, 16]
    scored = [[0] * n for n in lengths]
    for w in windows(lengths, context_len, stride):
        assert w.end - w.start <= context_len and w.num_scored <= w.end - w.start - 1
        for p in range(w.end - w.num_scored, w.end):
            scored[w.doc][p] += 1
    assert scored == [[0] + [1] * (n - 1) for n in lengths]


def test_result_does_not_depend_on_batch_size(model, tokens):
    a = score(model, {"m": tiny_llama(1)}, tokens, 16, 5, batch_size=1)
    b = score(model, {"m": tiny_llama(1)}, tokens, 16, 5, batch_size=7)
    for name in (ORIGINAL, "m"):
        assert a[name].perplexity == pytest.approx(b[name].perplexity, rel=1e-5)
        assert a[name].kl == pytest.approx(b[name].kl, rel=1e-4)
        assert a[name].top1_agreement == b[name].top1_agreement


def test_model_against_itself_has_zero_kl_and_full_top1_agreement(model, tokens):
    got = score(model, {"self": model}, tokens, 16, 5)
    assert got["self"].kl == pytest.approx(0.0, abs=1e-6)
    assert got["self"].top1_agreement == 1.0
    assert got["self"].perplexity == pytest.approx(got[ORIGINAL].perplexity, rel=1e-6)


def test_a_different_model_has_positive_kl_and_lower_agreement(model, tokens):
    other = score(model, {"other": tiny_llama(1)}, tokens, 16, 5)["other"]
    assert other.kl > 0.01 and other.top1_agreement < 0.9


def test_kl_is_the_mean_over_scored_tokens_of_kl_orig_to_quant(model, tokens):
    other = tiny_llama(1)
    got = score(model, {"other": other}, tokens, 8, 8)["other"]
    kls = []
    for doc in tokens.docs:
        for s in range(0, len(doc), 8):
            chunk = doc[s : s + 8][None]
            with torch.no_grad():
                p = torch.log_softmax(model(chunk).logits[0, :-1].float(), -1)
                q = torch.log_softmax(other(chunk).logits[0, :-1].float(), -1)
            kls += (p.exp() * (p - q)).sum(-1).tolist()
    assert got.kl == pytest.approx(sum(kls) / len(kls), rel=1e-4)


def test_doc_spread_summarizes_per_document_perplexity(model, tokens):
    got = score(model, {}, tokens, 16, 5)[ORIGINAL]
    spread = got.doc_spread()
    assert len(got.doc_perplexity) == 4
    assert spread["min"] <= spread["median"] <= spread["max"] and spread["std"] > 0


def test_per_window_kl_and_top1_weighted_by_scored_tokens_give_the_totals(model, tokens):
    got = score(model, {"other": tiny_llama(1)}, tokens, 16, 5)["other"]
    wins = windows([len(d) for d in tokens.docs], 16, 5)
    assert len(got.window_kl) == len(got.window_top1) == len(wins)
    n = [w.num_scored for w in wins]
    assert sum(k * c for k, c in zip(got.window_kl, n)) / sum(n) == pytest.approx(got.kl, rel=1e-9)
    assert sum(a * c for a, c in zip(got.window_top1, n)) / sum(n) == pytest.approx(got.top1_agreement, rel=1e-9)
    assert min(got.window_kl) < max(got.window_kl)  # a spread, not one value repeated


def test_token_nll_leaves_only_each_documents_first_token_unscored(model, tokens):
    got = score(model, {}, tokens, 16, 5)[ORIGINAL]
    assert [len(t) for t in got.token_nll] == [len(d) for d in tokens.docs]
    for t in got.token_nll:
        assert t[0].isnan() and not t[1:].isnan().any()
    assert torch.cat([t[1:] for t in got.token_nll]).double().mean().item() == pytest.approx(got.nll, rel=1e-9)


class _Forbidden(torch.nn.Module):
    """An 'original' that must not run: the stored reference has to stand in for it."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the original model ran although its log-probs were stored")


def test_stored_reference_replaces_the_original_with_identical_numbers(model, tokens, tmp_path):
    from quantlab.evaluation.reference import StoredLogProbs

    other = tiny_llama(1)
    rows = sum(w.num_scored for w in windows([len(d) for d in tokens.docs], 16, 5))
    first = StoredLogProbs(tmp_path / "ref.safetensors", rows)
    assert not first.hit
    fresh = score(model, {"q": other}, tokens, 16, 5, batch_size=3, reference=first)
    first.save()
    second = StoredLogProbs(tmp_path / "ref.safetensors", rows)
    assert second.hit
    cached = score(_Forbidden(), {"q": other}, tokens, 16, 5, batch_size=3, reference=second)
    for name in (ORIGINAL, "q"):
        a, b = fresh[name], cached[name]
        assert (a.perplexity, a.kl, a.top1_agreement, a.window_kl) == (b.perplexity, b.kl, b.top1_agreement, b.window_kl)


def test_a_stored_reference_of_other_windows_is_not_used(model, tokens, tmp_path):
    from quantlab.evaluation.reference import StoredLogProbs

    rows = sum(w.num_scored for w in windows([len(d) for d in tokens.docs], 16, 5))
    ref = StoredLogProbs(tmp_path / "ref.safetensors", rows)
    score(model, {}, tokens, 16, 5, reference=ref)
    ref.save()
    assert not StoredLogProbs(tmp_path / "ref.safetensors", rows + 1).hit
