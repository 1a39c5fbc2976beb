"""GPTQ's inner loop over the columns of one lazy block: round a column, push its error onto the
block's later columns, next column.

``round_columns_ref`` is the reference, built from ``formats.fake_quantize`` and plain torch ops, and
the path taken on the CPU and for fp4 formats. ``round_columns`` runs the same loop as one Triton
kernel on CUDA for integer formats: one program holds a tile of rows across the whole block in
registers, so a column step costs no kernel launch (the reference launches about ten per column, and
on a GPU those launches, not the arithmetic, set GPTQ's speed). The kernel uses correctly rounded
division, products and differences (``div_rn``, ``mul_rn``, ``sub_rn``: no fused multiply-add) and
round-half-to-even, in the reference's order, so the two agree bit for bit
(``tests/algorithms/test_gptq_kernel.py``, on the GPU).
"""

from __future__ import annotations

import torch

from .. import formats

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def round_columns_ref(w1: torch.Tensor, hinv1: torch.Tensor, q1: torch.Tensor, err1: torch.Tensor,
                      start: int, qp: formats.QParams) -> None:
    """Round columns ``start .. start + n`` of the block, in place, n = ``qp.scale.shape[1]``.

    Args:
        w1: [rows, width] float32, the block's current weights; later columns receive the errors.
        hinv1: [width, width] float32, the block of the upper Cholesky factor of H^-1.
        q1, err1: [rows, width] float32 outputs: the rounded columns and their scaled errors.
        start: the first column to round (block-relative).
        qp: each column's parameters, ``scale`` (and ``zero_point``) [rows, n] in storage dtypes.
    """
    n = qp.scale.shape[1]
    # The loop runs on the transposed block, where a column is a contiguous row: on the CPU each column
    # step is bound by memory traffic, and strided columns cost about twice as much. The arithmetic is
    # the same, element for element.
    wt = w1[:, start:].T.contiguous()
    qt, errt = torch.empty_like(wt[:n]), torch.empty_like(wt[:n])
    scale = qp.scale.T.contiguous()
    zero_point = None if qp.zero_point is None else qp.zero_point.T.contiguous()
    for j in range(n):
        i = start + j
        col = wt[j]
        zp = None if zero_point is None else zero_point[j]
        qt[j] = formats.fake_quantize(col, formats.QParams(qp.fmt, scale[j], zp, qp.global_scale))
        errt[j] = (col - qt[j]) / hinv1[i, i]
        wt[j:] -= hinv1[i, i:].unsqueeze(1) * errt[j].unsqueeze(0)
    w1[:, start:] = wt.T
    q1[:, start:start + n] = qt.T
    err1[:, start:start + n] = errt.T


def round_columns(w1: torch.Tensor, hinv1: torch.Tensor, q1: torch.Tensor, err1: torch.Tensor,
                  start: int, qp: formats.QParams) -> None:
    """``round_columns_ref``, as one Triton kernel when it can: CUDA tensors and an integer format."""
    spec = formats.get_spec(qp.fmt)
    if triton is None or not w1.is_cuda or spec.family != "int" or w1.shape[1] > 256:
        return round_columns_ref(w1, hinv1, q1, err1, start, qp)
    rows, width = w1.shape
    n = qp.scale.shape[1]
    scale = qp.scale.float().contiguous()
    zp = scale if qp.zero_point is None else qp.zero_point.float().contiguous()
    block_rows = 16
    _round_columns_kernel[(triton.cdiv(rows, block_rows),)](
        w1, hinv1, scale, zp, q1, err1, rows, width, start, n,
        w1.stride(0), w1.stride(1), hinv1.stride(0), hinv1.stride(1), scale.stride(0), scale.stride(1),
        zp.stride(0), zp.stride(1), q1.stride(0), q1.stride(1), err1.stride(0), err1.stride(1),
        float(spec.qmin), float(spec.qmax),
        HAS_ZP=qp.zero_point is not None, WIDTH=triton.next_power_of_2(width), BLOCK_ROWS=block_rows,
    )


if triton is not None:

    @triton.jit
    def _round_columns_kernel(w_ptr, h_ptr, s_ptr, z_ptr, q_ptr, e_ptr, rows, width, start, n,
                              sw_r, sw_c, sh_r, sh_c, ss_r, ss_c, sz_r, sz_c, sq_r, sq_c, se_r, se_c,
                              qmin, qmax, HAS_ZP: tl.constexpr, WIDTH: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, WIDTH)
        rmask = r < rows
        cmask = c < width
        r64 = r.to(tl.int64)
        tile_mask = rmask[:, None] & cmask[None, :]
        work = tl.load(w_ptr + r64[:, None] * sw_r + c[None, :] * sw_c, mask=tile_mask, other=0.0)
        for j in range(n):
            i = start + j
            col = tl.sum(tl.where(c[None, :] == i, work, 0.0), axis=1)
            scale = tl.load(s_ptr + r64 * ss_r + j * ss_c, mask=rmask, other=1.0)
            code = libdevice.rint(libdevice.div_rn(col, scale))
            if HAS_ZP:
                zp = tl.load(z_ptr + r64 * sz_r + j * sz_c, mask=rmask, other=0.0)
                code = libdevice.add_rn(code, zp)
            code = tl.minimum(tl.maximum(code, qmin), qmax)
            if HAS_ZP:
                code = libdevice.sub_rn(code, zp)
            qcol = libdevice.mul_rn(code, scale)
            err = libdevice.div_rn(libdevice.sub_rn(col, qcol), tl.load(h_ptr + i * sh_r + i * sh_c))
            tl.store(q_ptr + r64 * sq_r + i * sq_c, qcol, mask=rmask)
            tl.store(e_ptr + r64 * se_r + i * se_c, err, mask=rmask)
            hrow = tl.load(h_ptr + i * sh_r + c * sh_c, mask=cmask & (c >= i), other=0.0)
            update = libdevice.mul_rn(err[:, None], hrow[None, :])
            work = tl.where(c[None, :] >= i, libdevice.sub_rn(work, update), work)
        tl.store(w_ptr + r64[:, None] * sw_r + c[None, :] * sw_c, work, mask=tile_mask)
