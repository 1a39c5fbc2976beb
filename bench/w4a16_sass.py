"""SASS instructions per weight in the main loop of the W4A16 kernel, compiled offline for sm_90 (no GPU needed).

Compiles ``w4a16._w4a16_kernel`` with the installed Triton for ``GPUTarget("cuda", 90, 32)``, with the pointers
and N, K, K_CHUNK, stride_xm, MAGIC marked 16-divisible as the JIT marks them on the 4096-wide layers (without
that the loads are not vectorized), disassembles the cubin with Triton's bundled ``nvdisasm`` and counts the
instructions between the main loop's label and its backward branch, over the weights a thread handles per
step (BLOCK_K * BLOCK_N / (32 * num_warps)). Also reports local-memory instructions anywhere (spills) and
shared-memory / barrier instructions inside the loop. A count, not a time: docs/performance.md says what it
does and does not predict.

    python bench/w4a16_sass.py            # GEMV at 1, 2, 4 rows and the tensor-core form, every format
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantlab.engine.kernels import w4a16

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
GROUPS = {0: 128, 1: 128, 2: 16, 3: 32}  # FMT code -> group size
SHARED = {"LDS", "STS", "LDSM", "STSM", "BAR", "LDGSTS"}


def sass(fmt: int, block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> str:
    """The kernel's sm_90 SASS for one format code (``w4a16.FMT_CODES``) and launch config."""
    names = w4a16._w4a16_kernel.arg_names
    consts = dict(FMT=fmt, GROUP=GROUPS[fmt], HAS_BIAS=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    scales = "*u8" if fmt >= 2 else "*bf16"  # E4M3/E8M0 scales as bits; z_ptr is the scales where unused
    ptrs = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr=scales, z_ptr="*i8" if fmt == 1 else scales, g_ptr="*fp32",
                b_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32")
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    aligned = set(ptrs) | {"N", "K", "K_CHUNK", "stride_xm", "MAGIC"}
    src = ASTSource(w4a16._w4a16_kernel, sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(NVDISASM), "-c", str(path)], capture_output=True, text=True, check=True).stdout


def main_loop(text: str) -> tuple[list[str], list[str]]:
    """(every instruction, the longest backward-branch body's instructions), predicates stripped."""
    ins, labels, loops = [], {}, []
    for line in text.splitlines():
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.match(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(.*?)\s*;", line):
            ins.append(m.group(1))
            if (b := re.search(r"BRA\s.*?\.(L_x_\d+)", m.group(1))) and labels.get(b.group(1), len(ins)) < len(ins):
                loops.append(ins[labels[b.group(1)]:])
    return ins, max(loops, key=len, default=[])


def report(fmt: int, block_m: int, block_n: int, block_k: int = 256, warps: int = 4, stages: int = 3) -> str:
    """One line: the main loop's instructions, per weight and per weight and row, spills, shared memory."""
    ins, loop = main_loop(sass(fmt, block_m, block_n, block_k, warps, stages))
    ops = collections.Counter(i.split()[0].split(".")[0] for i in loop)
    per_weight = len(loop) / (block_k * block_n / (32 * warps))
    rows = block_m if block_m <= 4 else 1
    spills = sum(i.split()[0].split(".")[0] in ("LDL", "STL") for i in ins)
    return (f"fmt {fmt} block_m {block_m:2d} block_n {block_n:3d}: {len(loop)} in the loop, {per_weight:.2f} a weight"
            f" ({per_weight / rows:.2f} a weight and row); LDL/STL {spills}; shared/barrier in the loop "
            f"{sum(ops[o] for o in SHARED)}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    for fmt in GROUPS:
        for block_n in (64, 32):
            for block_m in (1, 2, 4):
                print(report(fmt, block_m, block_n))
        for block_n in (64, 128):
            print(report(fmt, 16, block_n, stages=4))
