"""What a person sees while ``quantlab eval`` runs: a numbered line as each phase starts
(``[2/5] perplexity, KL and top-1 ...``), a bar with an ETA while it runs, and the time it took.

Everything goes to stderr, so stdout carries only the closing summary; when progress is off
(``--quiet``, or stdout is not a terminal) nothing is printed at all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm


def wanted(quiet: bool, stream=None) -> bool:
    """Progress is shown unless ``--quiet`` or stdout (``stream``) is not a terminal (a script, a pipe)."""
    stream = sys.stdout if stream is None else stream
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """Numbered phases out of ``num_phases``; a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool, num_phases: int, stream=None):
        self.enabled, self.num_phases, self._done = enabled, num_phases, 0
        self.timings: list[tuple[str, float]] = []  # (phase, seconds), also when disabled: the report keeps them
        self.stream = sys.stderr if stream is None else stream

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, text: str, total: int | None = None, unit: str = "it") -> Iterator[Callable[[int], None]]:
        """Announce the next phase, time it, and yield ``advance(n)``, which moves its bar (drawn only
        when ``total`` is given) by ``n`` units."""
        self._done += 1
        self._print(f"[{self._done}/{self.num_phases}] {text}")
        started = time.time()
        bar = tqdm(total=total, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                   disable=not self.enabled or total is None)
        try:
            yield bar.update
        finally:
            bar.close()
        self.timings.append((text, time.time() - started))
        self._print(f"      done in {self.timings[-1][1]:.1f} s")
