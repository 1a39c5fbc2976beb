"""Promotion: a quantized checkpoint becomes an engine only after its recipe's gates passed on *it*.

``quantlab eval`` writes ``<checkpoint>/eval/report.json`` with ``checkpoint_digest`` (the digest of the
checkpoint's top-level files when it was evaluated) and ``passed``. A report of another checkpoint, of
this one before a file changed, or one whose gates failed does not promote. The report is read
defensively: a missing or malformed field is a refusal naming it, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.checkpoint.digest import checkpoint_digest
from quantlab.errors import QuantlabError

REPORT = Path("eval") / "report.json"


class PromotionError(QuantlabError):
    """The checkpoint has no passing evaluation of its exact bytes (exit 3, like a failed gate)."""

    exit_code = 3


def check_promotion(checkpoint: str | Path, digest: str | None = None) -> None:
    """Return when ``checkpoint`` has a passing report of its current digest, else PromotionError."""
    path = Path(checkpoint) / REPORT
    hint = "run quantlab eval on it first, or pass --skip-gates (recorded in engine.json)"
    if not path.is_file():
        raise PromotionError(f"{checkpoint} has no evaluation report ({path}); {hint}")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PromotionError(f"{path} is not valid JSON; {hint}") from None
    if not isinstance(report, dict) or not isinstance(report.get("checkpoint_digest"), str):
        raise PromotionError(f"{path} records no checkpoint_digest (written by an older quantlab eval); {hint}")
    if report["checkpoint_digest"] != (digest or checkpoint_digest(checkpoint)):
        raise PromotionError(f"{path} evaluated other checkpoint bytes than {checkpoint} holds now; {hint}")
    if report.get("passed") is not True:
        raise PromotionError(f"{checkpoint} failed its evaluation gates ({path}); fix the recipe, or pass --skip-gates")
