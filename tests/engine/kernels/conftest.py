"""Run the Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads the variable when a kernel is decorated, and its own language helpers (``tl.zeros`` ...) are
decorated when ``triton.language`` is imported, so the variable must be set before any triton import. This
conftest sets it when collection reaches this folder. If the process imported triton earlier (other tests
importing the engine), the ``interpreted`` fixture drops triton's Python modules (its compiled extension
stays loaded) and the kernel modules from ``sys.modules``, imports them again under the variable, and
puts the originals back afterwards, so the rest of the suite sees the modules it imported.

Known limit of the interpreter (triton 3.9): ``tl.dot`` on bfloat16 operands returns garbage on the CPU,
so the tensor-core kernels are checked here with float16 activations (the same code with the other 16-bit
dtype); bfloat16 is checked on the GPU by test_gpu.py (marked gpu) and bench/kernels.py's correctness pass.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest


def _ours(name: str) -> bool:
    return (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C") or \
        name.startswith("quantlab.engine.kernels")


@pytest.fixture(scope="module")
def interpreted():
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    saved = {name: mod for name, mod in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    yield importlib.import_module
    for name in [n for n in sys.modules if _ours(n)]:
        del sys.modules[name]
    sys.modules.update(saved)
    for name, mod in saved.items():  # parents' attributes point at the re-imported children: point back
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
    if old_env is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = old_env
