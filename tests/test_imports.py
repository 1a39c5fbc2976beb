"""Imports run one way (../shared/STYLE.md's module map): the recipe never imports the algorithms, the
checkpoint package never imports the pipeline, the models or the data, ``formats`` imports only
``errors``, and no two parts of quantlab import each other (not even lazily inside a function)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"quantlab": REPO / "quantlab", "quantlab.engine": REPO / "engine", "quantlab.evaluation": REPO / "evaluation"}

# importing the key (in a fresh interpreter) must not load any module under these names
FORBIDDEN = {
    "quantlab.recipe": ["quantlab.algorithms", "quantlab.pipeline", "quantlab.checkpoint", "quantlab.models", "quantlab.data"],
    "quantlab.formats": ["quantlab.recipe", "quantlab.algorithms", "quantlab.pipeline", "quantlab.checkpoint",
                         "quantlab.models", "quantlab.data", "quantlab.observers", "quantlab.fake_quant"],
    # writer and inspect between them import every module of the package (inspect -> reader -> stream)
    **{f"quantlab.checkpoint.{m}": ["quantlab.pipeline", "quantlab.models", "quantlab.data", "quantlab.algorithms"]
       for m in ("writer", "inspect")},
    "quantlab.engine.kernels": ["quantlab.pipeline", "quantlab.algorithms", "quantlab.models", "quantlab.data"],
}


def _loaded_after_import(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_importing_loads_no_module_upstream(module):
    loaded = _loaded_after_import(module)
    assert module in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[module])]
    assert bad == []


# the parts of quantlab: its top-level modules and packages
PARTS = {f.stem for f in (REPO / "quantlab").iterdir() if f.suffix == ".py" or (f / "__init__.py").is_file()} | {
    "engine", "evaluation", "cli"}


def _unit(dotted: str) -> str | None:
    """The part of quantlab a module belongs to: ``quantlab.checkpoint.reader`` -> ``checkpoint``."""
    parts = dotted.split(".")
    if parts[0] != "quantlab" or len(parts) < 2:
        return None
    # cli.py, cli_engine.py and cli_serve.py are one part, the command line: the latter two register
    # their commands on cli.py's app, which imports them.
    return "cli" if parts[1].startswith("cli") else parts[1]


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for prefix, root in ROOTS.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("").parts
            if not all((root / Path(*rel[:i]) / "__init__.py").is_file() for i in range(len(rel))):
                continue  # data directories (evaluation/tasks/) hold scripts, not quantlab modules
            name = ".".join([prefix, *[p for p in rel if p != "__init__"]])
            package = name if f.name == "__init__.py" else name.rpartition(".")[0]
            targets = set()
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                    mod = ".".join(base + ([node.module] if node.module else []))
                    # ``from quantlab import formats`` names a part; ``from .. import __version__`` does not
                    targets |= {mod} | ({f"{mod}.{a.name}" for a in node.names} if mod == "quantlab" else set())
            src = _unit(name)
            if src is None:
                continue  # quantlab/__init__.py
            graph.setdefault(src, set()).update(u for u in map(_unit, targets) if u and u != src and u in PARTS)
    return graph


def test_import_graph_of_quantlab_parts_has_no_cycle():
    graph = _import_graph()
    assert {"recipe", "formats", "checkpoint", "pipeline", "engine", "evaluation"} <= set(graph)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for n in sorted(graph) if n not in state and (c := visit(n, []))]
    assert cycles == []


def test_recipe_and_checkpoint_arrows_point_one_way():
    graph = _import_graph()
    assert "algorithms" not in graph["recipe"]
    assert not graph["checkpoint"] & {"pipeline", "models", "data", "algorithms"}
