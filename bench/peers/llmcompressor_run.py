"""Quantize a float HF model with llm-compressor (the peer tool), for comparison with quantlab.

Runs INSIDE the peer venv made by bench/peers/setup_peer_venv.sh, never in quantlab's own
environment (llm-compressor pins its own transformers / compressed-tensors):

    .peer-venv/bin/python bench/peers/llmcompressor_run.py \\
        --model-dir .cache/peer-smollm2-float --scheme W4A16_GPTQ_G64_ASYM \\
        --calib-file calib_data/gpl-3.txt --num-samples 32 --seq-len 256 \\
        --output .cache/peer-out/W4A16_GPTQ_G64_ASYM [--kv-fp8]

--model-dir is a plain float model directory written by save_pretrained (config.json, safetensors,
tokenizer); bench/peers/make_float_model.py makes one from the default GGUF model. The result is
saved with ``save_compressed=True`` (compressed-tensors format) plus the tokenizer to --output.

Output contract: stdout carries exactly one line, a JSON object, printed last. Everything the
libraries print goes to stderr (file descriptor 1 is pointed at stderr while they run).
  success (exit 0):
    {"scheme": ..., "calib_seconds": <wall time of oneshot() only>, "peak_rss_mib": <ru_maxrss of
     this process, whole run>, "output": <abs dir>, "llmcompressor_version": ..., "ok": true,
     plus informational keys: "save_seconds", "num_samples", "seq_len", "kv_fp8", "actorder",
     "compressed_tensors_version", "transformers_version", "torch_version"}
  failure (exit 1):
    {"ok": false, "error": "<one sentence>"}

Calibration samples (quantlab must build exactly the same ones)
---------------------------------------------------------------
1. Text: a ``.jsonl`` file is read as UTF-8, one JSON object per non-blank line, and the ``"text"``
   fields of all rows, in file order, are joined with ``"\\n\\n"``. Any other file is read whole as
   UTF-8 text, unchanged (no stripping, no newline normalisation beyond Python's universal newlines
   in text mode).
2. Tokens: the model's own tokenizer is applied ONCE to that whole text, with
   ``add_special_tokens=False`` (no BOS/EOS inserted anywhere):
   ``ids = tokenizer(text, add_special_tokens=False)["input_ids"]``; let T = len(ids).
3. Windows: sample i (0-based, i < num_samples) is the L = seq_len consecutive tokens starting at
   offset i*L of the token stream, where the stream wraps around cyclically to its beginning when it
   runs out: ``sample[i][j] = ids[(i*L + j) % T]`` for j in 0..L-1. So the windows are consecutive,
   non-overlapping, exactly L tokens each, taken in order from the start of the text; only when
   num_samples*L > T does a window cross the end of the text and continue with its first tokens
   (e.g. GPL-3 with the SmolLM2 tokenizer has T = 7,658 tokens, so at 32 x 256 the 30th window,
   i = 29, is ids[7424:7658] + ids[0:22], and windows 30-31 continue from ids[22:]).
4. Each sample's attention_mask is all ones; no padding, no shuffling (shuffle_calibration_samples
   is off), batch size 1, samples fed in index order.
``build_calibration_windows`` below implements steps 3-4 on a plain list of ints and imports
nothing heavy, so other code can import this file to reproduce or check the samples;
``--dump-samples PATH`` writes the exact token windows used as JSON.

Schemes (lm_head is never quantized; targets = every Linear layer)
------------------------------------------------------------------
FP8_DYNAMIC              QuantizationModifier(scheme="FP8_DYNAMIC"): FP8 per-channel weights,
                         per-token dynamic FP8 activations. Data-free.
W8A8_SQ                  SmoothQuantModifier(smoothing_strength=0.8), then
                         GPTQModifier(scheme="W8A8"): INT8 per-channel W, per-token dynamic INT8 A.
W4A16_RTN_G64_SYM/ASYM   QuantizationModifier, INT4 weights, group 64 via config_groups (the W4A16
                         preset uses group 128, and SmolLM2's hidden size 576 is not a multiple of
                         128). Round-to-nearest with min-max ranges. Data-free.
W4A16_GPTQ_G64_SYM/ASYM  GPTQModifier with the same config_groups, actorder=None (plain GPTQ,
                         columns in natural order). NB: llm-compressor 0.14's own default for
                         GPTQModifier is actorder="static" (= "weight"); these names turn it off so
                         that *_ACTORDER is the only variant with reordering. W8A8_SQ likewise.
W4A16_GPTQ_G64_ASYM_ACTORDER
                         GPTQ with actorder="weight". compressed-tensors 0.19 (the version
                         llm-compressor 0.14.0.1 pins) removed actorder="group"/"dynamic" (its
                         validator raises "actorder='group' has been removed"); "weight" (alias
                         "static") is the one it supports: columns processed in order of
                         decreasing Hessian diagonal, groups kept contiguous, no g_idx stored.
W4A16_AWQ_G64_ASYM       AWQModifier() (default Llama mappings, duo_scaling=True, n_grid=20), then
                         QuantizationModifier with INT4 asym g64 config_groups. On a machine
                         without an accelerator, IntermediatesCache._pin_intermediate
                         (llmcompressor/pipelines/cache.py) is replaced with a no-op in this
                         process, since pinning host memory needs an accelerator ("Cannot access
                         accelerator device when none is available"); pinning only speeds
                         host-to-device copies. Slow on CPU (~47 min at 32 x 256 on 2 cores).
NVFP4A16                 preset: FP4 E2M1 weights, group 16, FP8 E4M3 group scales + a global scale.
NVFP4                    preset: NVFP4A16 plus FP4 activations (dynamic local group-16 scales under a
                         calibrated per-tensor global scale).
MXFP4                    preset in compressed-tensors 0.19: MX FP4 weights AND dynamic MX FP4
                         activations, group 32, power-of-two (E8M0, uint8) scales.
MXFP4A16                 preset: the weight-only half of MXFP4 (extra, not in the original list).

--kv-fp8 adds kv_cache_scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor",
dynamic=False, symmetric=True) to the (last) quantization modifier of the recipe: static per-tensor
FP8 k/v scales calibrated on the same samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

IGNORE = ["lm_head"]
GROUP_SIZE = 64

SCHEMES = (
    "FP8_DYNAMIC",
    "W8A8_SQ",
    "W4A16_RTN_G64_SYM",
    "W4A16_RTN_G64_ASYM",
    "W4A16_GPTQ_G64_SYM",
    "W4A16_GPTQ_G64_ASYM",
    "W4A16_GPTQ_G64_ASYM_ACTORDER",
    "W4A16_AWQ_G64_ASYM",
    "NVFP4A16",
    "NVFP4",
    "MXFP4",
    "MXFP4A16",
)


class UserError(Exception):
    """An error whose message is already a readable sentence."""


# --------------------------------------------------------------------------- calibration samples


def read_calibration_text(path: str | os.PathLike, text_field: str = "text") -> str:
    """Step 1 of the rule in the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if text_field not in row:
                    raise UserError(f"{path} line {lineno} has no {text_field!r} field")
                texts.append(row[text_field])
        return "\n\n".join(texts)
    with open(path, encoding="utf-8") as f:
        return f.read()


def build_calibration_windows(ids: list[int], num_samples: int, seq_len: int) -> list[list[int]]:
    """Step 3: sample i = ids[(i*seq_len + j) % len(ids)] for j < seq_len (cyclic token stream)."""
    total = len(ids)
    if total == 0:
        raise UserError("the calibration text tokenizes to zero tokens")
    if num_samples < 1 or seq_len < 1:
        raise UserError("--num-samples and --seq-len must be positive")
    return [[ids[(i * seq_len + j) % total] for j in range(seq_len)] for i in range(num_samples)]


# --------------------------------------------------------------------------- recipes


def _int4_g64_groups(symmetric: bool) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {
        "group_0": QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=4,
                type="int",
                strategy="group",
                group_size=GROUP_SIZE,
                symmetric=symmetric,
                dynamic=False,
            ),
        )
    }


def build_recipe(scheme: str, kv_fp8: bool) -> tuple[list, str | None]:
    """Return (list of modifiers, actorder used or None)."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    kv: dict[str, Any] = {}
    if kv_fp8:
        kv["kv_cache_scheme"] = QuantizationArgs(
            num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True
        )

    if scheme in ("FP8_DYNAMIC", "NVFP4A16", "NVFP4", "MXFP4", "MXFP4A16"):
        return [QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE, **kv)], None
    if scheme == "W8A8_SQ":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE, actorder=None, **kv),
        ], None
    if scheme in ("W4A16_RTN_G64_SYM", "W4A16_RTN_G64_ASYM"):
        groups = _int4_g64_groups(symmetric=scheme.endswith("_SYM"))
        return [QuantizationModifier(config_groups=groups, ignore=IGNORE, **kv)], None
    if scheme.startswith("W4A16_GPTQ_G64_"):
        actorder = "weight" if scheme.endswith("_ACTORDER") else None
        symmetric = scheme == "W4A16_GPTQ_G64_SYM"
        groups = _int4_g64_groups(symmetric=symmetric)
        return [GPTQModifier(config_groups=groups, ignore=IGNORE, actorder=actorder, **kv)], actorder
    if scheme == "W4A16_AWQ_G64_ASYM":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        groups = _int4_g64_groups(symmetric=False)
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=IGNORE, **kv)], None
    raise UserError(f"scheme {scheme} is not supported by this runner")


def patch_pinning_for_cpu() -> bool:
    """Make IntermediatesCache._pin_intermediate a no-op when there is no accelerator.

    Pinning (page-locking) host memory needs an accelerator runtime; on a CPU-only machine AWQ's
    activation cache otherwise fails with "Cannot access accelerator device when none is available".
    Returns True if the patch was applied.
    """
    import torch
    from llmcompressor.pipelines import cache as cache_mod

    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if has_accel:
        return False

    def _no_pin(cls, intermediate) -> None:  # noqa: ARG001 - same signature as the original
        return None

    cache_mod.IntermediatesCache._pin_intermediate = classmethod(_no_pin)
    return True


# --------------------------------------------------------------------------- main


def _one_sentence(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = msg if isinstance(exc, UserError) else f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def _nll(model, ids) -> float:
    import torch

    with torch.no_grad():
        return float(model(ids, labels=ids).loss.float())


def score_checkpoint(output: Path, eval_file: Path) -> dict:
    """Perplexity of a saved checkpoint on the eval file's tokens: ``ppl`` on ``ids`` (one sequence)
    and, if the file has ``wide`` (equal-length windows, each scored on its own), ``ppl_wide`` and the
    windows' mean token NLLs ``nll_wide``.

    The checkpoint is loaded back through transformers' compressed-tensors integration (what a user of
    the peer does). It is scored in float32 where the integration allows it; its NVFP4/MXFP4 path
    decompresses to bfloat16 whatever dtype is asked for, so those are scored in bfloat16 throughout.
    """
    import math

    import torch
    from transformers import AutoModelForCausalLM

    data = json.loads(eval_file.read_text())
    ids = torch.tensor([data["ids"]])
    eval_dtype = torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    try:
        ppl = math.exp(_nll(loaded, ids))
    except RuntimeError:
        eval_dtype = torch.bfloat16
        loaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16).eval()
        ppl = math.exp(_nll(loaded, ids))
    scores = {"ppl": ppl, "eval_dtype": str(eval_dtype).removeprefix("torch.")}
    if data.get("wide"):
        nll = [_nll(loaded, torch.tensor([w])) for w in data["wide"]]
        scores["ppl_wide"], scores["nll_wide"] = math.exp(sum(nll) / len(nll)), nll
    return scores


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    import importlib.metadata as md

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot

    model_dir = Path(args.model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model directory (no config.json)")
    output = Path(args.output).resolve()

    pinned_patch = patch_pinning_for_cpu()
    if pinned_patch:
        log("no accelerator: IntermediatesCache._pin_intermediate patched to a no-op")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.samples_file:
        # The caller's exact token windows (the accuracy benchmark passes quantlab's, so both tools
        # calibrate on identical samples).
        windows = json.loads(Path(args.samples_file).read_text())["samples"]
        args.num_samples, args.seq_len = len(windows), len(windows[0])
        ids = [t for w in windows for t in w]
        log(f"calibration: {len(windows)} x {args.seq_len} windows from {args.samples_file}")
    else:
        if not args.calib_file:
            raise UserError("give --calib-file or --samples-file")
        text = read_calibration_text(args.calib_file)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows = build_calibration_windows(ids, args.num_samples, args.seq_len)
        log(f"calibration: {len(ids)} tokens in {args.calib_file}; {args.num_samples} x {args.seq_len} windows"
            + (" (wrapped around)" if args.num_samples * args.seq_len > len(ids) else ""))
    if args.dump_samples:
        Path(args.dump_samples).write_text(json.dumps({"num_tokens": len(ids), "samples": windows}))
    dataset = Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * args.seq_len for _ in windows]}
    )

    recipe, actorder = build_recipe(args.scheme, args.kv_fp8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
        save_compressed=True,
    )
    calib_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    save_seconds = time.perf_counter() - t1

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, before eval
    scores = {"ppl": None, "eval_dtype": None}
    if args.eval_ids:
        del model
        scores = score_checkpoint(output, Path(args.eval_ids))
    return {
        **scores,
        "scheme": args.scheme,
        "calib_seconds": round(calib_seconds, 3),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "output": str(output),
        "llmcompressor_version": md.version("llmcompressor"),
        "ok": True,
        "save_seconds": round(save_seconds, 3),
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "kv_fp8": bool(args.kv_fp8),
        "actorder": actorder,
        "compressed_tensors_version": md.version("compressed-tensors"),
        "transformers_version": md.version("transformers"),
        "torch_version": md.version("torch"),
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags also answer with the one JSON line, exit 1
        self.print_usage(sys.stderr)
        print(json.dumps({"ok": False, "error": f"bad arguments: {message}"}))
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        description="Quantize a float HF model with llm-compressor; prints one JSON line.",
        epilog="See the module docstring for the calibration-sample rule and the scheme recipes.",
    )
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--scheme", required=True, help="one of: " + ", ".join(SCHEMES))
    ap.add_argument("--calib-file", default=None, help="UTF-8 text file, or .jsonl with a 'text' field")
    ap.add_argument("--samples-file", default=None, help='JSON {"samples": [[token ids], ...]}: use these windows')
    ap.add_argument("--eval-ids", default=None, help='JSON {"ids": [...]}: report the saved checkpoint\'s perplexity on them')
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--output", required=True)
    ap.add_argument("--kv-fp8", action="store_true", help="also quantize the KV cache to FP8 (calibrated scales)")
    ap.add_argument("--dump-samples", default=None, help="write the calibration token windows to this JSON file")
    ap.add_argument("--score-only", action="store_true", help="only score the checkpoint already at --output on --eval-ids")
    args = ap.parse_args(argv)

    # Keep stdout for the single JSON line: point fd 1 at stderr while the libraries run.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)

    def log(msg: str) -> None:
        print(f"[llmcompressor_run] {msg}", file=sys.stderr, flush=True)

    try:
        if args.scheme not in SCHEMES:
            raise UserError(f"unsupported scheme {args.scheme!r}; supported: {', '.join(SCHEMES)}")
        if args.score_only:
            result, code = {"ok": True, **score_checkpoint(Path(args.output), Path(args.eval_ids))}, 0
        else:
            result, code = run(args, log), 0
    except BaseException as exc:  # noqa: BLE001 - report every failure as one JSON line
        if isinstance(exc, KeyboardInterrupt):
            raise
        import traceback

        traceback.print_exc(file=sys.stderr)
        result, code = {"ok": False, "error": _one_sentence(exc)}, 1

    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(real_stdout, 1)
    os.close(real_stdout)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
