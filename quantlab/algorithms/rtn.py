"""Round-to-nearest: each weight quantized independently with its observer's range."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RTNParams:
    """RTN has no parameters: the range comes from the scheme's observer."""
