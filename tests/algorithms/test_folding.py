"""fold_scales moves per-channel scales between ops without changing the float function."""

import pytest
import torch
from torch import nn

from quantlab.algorithms.folding import fold_scales


class RMSNorm(nn.Module):
    """LlamaRMSNorm's arithmetic: weight * x / rms(x)."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _scales(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g) * 1.5)  # spans ~e^-4 .. e^4


def _assert_close_relative(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5):
    assert (a - b).abs().max() <= rtol * b.abs().max(), f"max abs diff {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("norm_cls", [RMSNorm, nn.LayerNorm])
def test_folding_into_norm_keeps_block_output(norm_cls):
    torch.manual_seed(0)
    norm = norm_cls(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    linears = [nn.Linear(64, 48), nn.Linear(64, 32, bias=False)]
    x = torch.randn(10, 64)
    before = [lin(norm(x)) for lin in linears]
    fold_scales(norm, linears, _scales(64))
    for lin, ref in zip(linears, before):
        _assert_close_relative(lin(norm(x)), ref)


def test_folding_into_linear_keeps_chain_output():
    torch.manual_seed(0)
    prev, nxt = nn.Linear(32, 64), nn.Linear(64, 16)
    x = torch.randn(10, 32)
    before = nxt(prev(x))
    fold_scales(prev, [nxt], _scales(64))
    _assert_close_relative(nxt(prev(x)), before)


def test_folding_keeps_parameter_dtypes():
    norm, lin = RMSNorm(64).to(torch.bfloat16), nn.Linear(64, 8).to(torch.bfloat16)
    fold_scales(norm, [lin], _scales(64))
    assert norm.weight.dtype == lin.weight.dtype == torch.bfloat16


def test_folding_rejects_scales_of_the_wrong_length():
    with pytest.raises(AssertionError, match="output channels"):
        fold_scales(RMSNorm(64), [nn.Linear(64, 8)], torch.ones(32))
