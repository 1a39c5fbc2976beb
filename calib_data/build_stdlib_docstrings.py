"""Rebuild the stdlib-docstring calibration and held-out sets from the running Python's standard library.

The text is the English prose of CPython's own docstrings (PSF License). Modules are split by name so that
no module contributes to both sets: names starting with a-m go to calibration, n-z to held-out.
Run: python calib_data/build_stdlib_docstrings.py
"""

import ast
import json
import sys
import sysconfig
from pathlib import Path

MIN_CHARS = 300  # shorter docstrings are mostly signatures, not prose


def docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS and doc.count(">>>") == 0:
                yield doc


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    here = Path(__file__).parent
    sets = {"calib": [], "heldout": []}
    for path in sorted(stdlib.glob("*.py")):
        name = path.stem.lstrip("_")
        split = "calib" if name[:1].lower() <= "m" else "heldout"
        for doc in docstrings(path):
            sets[split].append({"text": doc, "source": f"python{sys.version_info[0]}.{sys.version_info[1]}/{path.name}"})
    for split, out in (("calib", here / "stdlib_docstrings.jsonl"), ("heldout", here / "heldout" / "stdlib_docstrings.jsonl")):
        with open(out, "w", encoding="utf-8") as f:
            for row in sets[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{out}: {len(sets[split])} docstrings, {sum(len(r['text']) for r in sets[split])} chars")


if __name__ == "__main__":
    main()
