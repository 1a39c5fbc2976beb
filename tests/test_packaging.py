"""The wheel holds every module and the data runtime code reads, builds without a setuptools warning, and
works installed in a fresh virtual environment that cannot see the source tree: every module imports,
``quantlab --help`` runs, and a tiny model calibrates on the bundled default calibration text.

No network: the wheel is built with this interpreter's setuptools (the ``test`` extra pins it), installed
with ``--no-deps --no-index``, and the fresh environment reaches the dependencies through a ``.pth`` file
naming this interpreter's site-packages directories (plain path lines: the ``.pth`` files inside them,
such as this environment's editable quantlab finder, are not run there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Top-level directories that install under the quantlab namespace (setup.py's ROOTS, code only).
CODE_ROOTS = {"quantlab": "quantlab", "engine": "quantlab.engine", "evaluation": "quantlab.evaluation"}

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import quantlab
names = sorted(m.name for m in pkgutil.walk_packages(quantlab.__path__, "quantlab."))
files = {n: importlib.import_module(n).__file__ for n in ["quantlab", *names]}
print(json.dumps(files))
"""

RECIPE = """\
model: {model}
output: {output}
calibration: {{num_samples: 4, seq_len: 16}}
quantization:
  schemes:
    - targets: [Linear]
      weights: {{format: int8, granularity: channel}}
stages:
  - rtn: {{}}
"""


def _source_modules() -> set[str]:
    """Module names the source tree defines in regular packages (data directories such as
    evaluation/tasks/ have no __init__.py and hold no importable module of quantlab's)."""
    names = set()
    for root, prefix in CODE_ROOTS.items():
        for f in (REPO / root).rglob("*.py"):
            parts = f.relative_to(REPO / root).with_suffix("").parts
            if all((REPO / root / Path(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
                dotted = ".".join(p for p in parts if p != "__init__")
                names.add(f"{prefix}.{dotted}" if dotted else prefix)
    return names


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin dir, build log) of a fresh environment with the wheel of this tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], REPO).split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(tmp / 'dist')!r})"]
    log = _run(build, src, env)
    (wheel,) = (tmp / "dist").glob("quantlab-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]  # incl. those .pth files add
    (purelib / "_quantlab_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    return python, venv / "bin", log, venv


def test_wheel_builds_without_a_setuptools_warning(installed):
    _, _, log, _ = installed
    assert [line for line in log.splitlines() if "warn" in line.lower()] == []


def test_every_module_imports_from_the_wheel_not_the_source(installed, tmp_path):
    python, _, _, venv = installed
    files = json.loads(_run([python, "-c", IMPORT_ALL], tmp_path).strip().splitlines()[-1])
    assert set(files) == _source_modules()
    outside = [n for n, f in files.items() if not Path(f).resolve().is_relative_to(venv.resolve())]
    assert outside == []


def test_quantlab_help_runs_installed(installed, tmp_path):
    _, bin_dir, _, _ = installed
    out = _run([bin_dir / "quantlab", "--help"], tmp_path)
    assert "calibrate" in out and "inspect" in out


def test_tiny_model_calibrates_on_bundled_data_installed(installed, tmp_path):
    _, bin_dir, _, venv = installed
    model = _tiny_model(tmp_path / "tiny")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(model=model, output=tmp_path / "ckpt"))
    _run([bin_dir / "quantlab", "calibrate", "recipe.yaml", "--device", "cpu", "--quiet"], tmp_path)
    source = Path(json.loads((tmp_path / "ckpt" / "quantlab.json").read_text())["calibration"]["source"])
    assert source.name == "gpl-3.txt" and source.resolve().is_relative_to(venv.resolve())
