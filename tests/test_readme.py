"""The README's example recipe is a valid recipe (the README is the first thing a newcomer copies)."""

from __future__ import annotations

import re
from pathlib import Path

from quantlab.recipe import load_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_recipe_loads(tmp_path):
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no yaml example"
    path = tmp_path / "example.yaml"
    path.write_text(block.group(1))
    recipe = load_recipe(path)
    assert [s.algorithm for s in recipe.stages] == ["awq", "gptq"]
