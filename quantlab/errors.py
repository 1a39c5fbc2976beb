"""User-facing errors. Each one's ``str()`` is a single sentence the CLI prints without a traceback."""

from __future__ import annotations


class QuantlabError(Exception):
    """A mistake in the user's input or environment that quantlab can explain in one sentence."""

    exit_code = 2


class RecipeError(QuantlabError):
    """A recipe value is missing, unknown, of the wrong type, or impossible in combination.

    Rendered as ``recipes/x.yaml:12: stages[0].weights.group_size must be 32, 64 or 128 (got 100)``.
    """

    def __init__(self, file: str, line: int | None, key_path: str, expected: str, got: object = None):
        self.file, self.line, self.key_path, self.expected, self.got = file, line, key_path, expected, got
        where = f"{file}:{line}" if line is not None else file
        got_text = "" if got is None else f" (got {got!r})"
        super().__init__(f"{where}: {key_path} {expected}{got_text}")


class FormatError(QuantlabError):
    """A tensor cannot be quantized as asked (non-finite values, shape not divisible by the block)."""


class CheckpointError(QuantlabError):
    """A checkpoint or model directory is missing, incomplete or not what quantlab expects."""


class CalibrationError(QuantlabError):
    """Calibration cannot continue, e.g. NaN/inf appeared in a layer's activations or weights."""


class SamplingError(QuantlabError):
    """A sampling parameter is outside its allowed range; the message names the field and the range."""


class EngineRequestError(QuantlabError):
    """The engine cannot serve a request as asked, e.g. its prompt is empty or longer than the limits."""


class EngineDeadError(RuntimeError):
    """The engine's step loop has stopped (an exception in a step, or its thread exited), so no request can
    run until the process is restarted. Not a QuantlabError: it is no fault of the request, and a server
    answers it with 503, not 400."""
