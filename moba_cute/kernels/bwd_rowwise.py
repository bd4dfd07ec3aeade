"""Row-wise kernels around the MoBA backward (any sm80+ GPU), replacing PyTorch ops that would
each cost a launch and a pass over memory:

* :class:`BwdPrepKernel`: ``delta[row, h] = sum_d dO * O - dlse[h, row]`` (fp32; ``dlse``
  optional) and, in the same pass, ``dQ_acc[row, h, :] = 0`` (the dQ slot passes
  read-modify-write it).
* :class:`DqConvertKernel`: ``dq = dQ_acc`` in the input dtype.
* :class:`DqReduceKernel`: ``dq`` from the sm90 backward's per-pair partials, summed in slot
  order.

All three map a group of ``GS`` lanes to one (row, head): each lane handles ``D / (8 GS)``
16-byte pieces (:class:`BwdPrepKernel`'s group reduces with butterfly shuffles). ``GS`` is the largest power of two
<= 16 dividing ``D / 8``, so a warp reads whole 16-byte pieces of consecutive rows (rows of one
token are contiguous: ``(total_q, H, D)``).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64

from .centroids import clamp_seq, find_segment

THREADS = 256


def _t(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


def group_size(head_dim: int) -> int:
    cv = head_dim // 8
    gs = 1
    while gs < 16 and cv % (2 * gs) == 0:
        gs *= 2
    return gs


def grid_blocks(rows: int, head_dim: int) -> int:
    """CTAs covering ``rows`` (row, head) pairs."""
    per = THREADS // group_size(head_dim)
    return (rows + per - 1) // per


class _RowwiseKernel:
    """The shared static configuration: dtype, head dim, the lane group per (row, head)."""

    def __init__(self, dtype, head_dim: int):
        assert head_dim % 8 == 0
        self.dtype = dtype
        self.D = head_dim
        self.GS = group_size(head_dim)
        self.NV = head_dim // 8 // self.GS  # 16-byte pieces per lane


class BwdPrepKernel(_RowwiseKernel):
    """delta and zeroed dQ_acc; see the module docstring. Compile key:
    ("bwdprep", dtype_name, head_dim, has_dlse), plus "nozero" without the dQ_acc zeroing."""

    def __init__(self, dtype, head_dim: int, has_dlse: bool, zero_dq: bool = True):
        super().__init__(dtype, head_dim)
        self.has_dlse = bool(has_dlse)
        self.zero_dq = bool(zero_dq)  # False: the sm90 backward (no dQ_acc)

    @cute.jit
    def __call__(self, out: cute.Pointer, dout: cute.Pointer, dlse: cute.Pointer, delta: cute.Pointer,
                 dq_acc: cute.Pointer, rows: Int32, total_q: Int32, H: Int32, nblocks: Int32,
                 stream: cuda.CUstream):
        self.kernel(out, dout, dlse, delta, dq_acc, rows, total_q, H).launch(
            grid=(nblocks, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, out: cute.Pointer, dout: cute.Pointer, dlse: cute.Pointer, delta: cute.Pointer,
               dq_acc: cute.Pointer, rows: Int32, total_q: Int32, H: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        GS = self.GS
        D = self.D
        g = bid * (THREADS // GS) + tid // GS
        lane = tid % GS
        acc = Float32(0.0)
        if g < rows:
            base = Int64(g) * Int64(D)
            for v in cutlass.range_constexpr(self.NV):
                off = base + Int64((v * GS + lane) * 8)
                o = cute.make_tensor(out + cute.assume(off, divby=8), cute.make_layout(8)).load().to(Float32)
                d = cute.make_tensor(dout + cute.assume(off, divby=8), cute.make_layout(8)).load().to(Float32)
                for e in cutlass.range_constexpr(8):
                    acc = acc + o[e] * d[e]
                if cutlass.const_expr(self.zero_dq):
                    z = cute.make_tensor(dq_acc + cute.assume(off, divby=8), cute.make_layout(8))
                    z.fill(0.0)
        for i in cutlass.range_constexpr(GS.bit_length() - 1):
            acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=1 << i)
        if (g < rows) & (lane == 0):
            if cutlass.const_expr(self.has_dlse):
                i = g // H
                h = g - i * H
                acc = acc - _t(dlse)[Int64(h) * Int64(total_q) + Int64(i)]
            _t(delta)[g] = acc


class DqConvertKernel(_RowwiseKernel):
    """dq (input dtype) from the fp32 dQ_acc. Compile key: ("dqconvert", dtype_name, head_dim)."""

    @cute.jit
    def __call__(self, dq_acc: cute.Pointer, dq: cute.Pointer, rows: Int32, nblocks: Int32,
                 stream: cuda.CUstream):
        self.kernel(dq_acc, dq, rows).launch(grid=(nblocks, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, dq_acc: cute.Pointer, dq: cute.Pointer, rows: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        GS = self.GS
        g = bid * (THREADS // GS) + tid // GS
        lane = tid % GS
        if g < rows:
            base = Int64(g) * Int64(self.D)
            for v in cutlass.range_constexpr(self.NV):
                off = base + Int64((v * GS + lane) * 8)
                x = cute.make_tensor(dq_acc + cute.assume(off, divby=8), cute.make_layout(8)).load()
                cute.make_tensor(dq + cute.assume(off, divby=8), cute.make_layout(8)).store(x.to(self.dtype))


class DqReduceKernel(_RowwiseKernel):
    """dq (input dtype) of one window of query heads ``[h0, h0 + Hw)`` from the sm90
    backward's per-pair partials (input dtype, the window's buffer: row-major over (row, head of
    the window, slot)): ``dq[row, h] = sum_s part_dq[(row * Hw + h - h0) * K + s]`` in fp32 over
    the slots ``s`` whose selection entry is a chunk of the row's sequence (``0 <= sel < chunks``;
    other slots have no partial), in slot order (bitwise deterministic). Rows outside every
    sequence (garbage ``cu_seqlens``: the routing never wrote their slots) get ``dq = 0``
    without reading their selection. Compile key: ("dqreduce", dtype_name, head_dim)."""

    @cute.jit
    def __call__(self, part_dq: cute.Pointer, sel: cute.Pointer, cu_q: cute.Pointer, cu_chunks: cute.Pointer,
                 dq: cute.Pointer, B: Int32, total_q: Int32, H: Int32, h0: Int32, Hw: Int32, topk: Int32,
                 nblocks: Int32, stream: cuda.CUstream):
        self.kernel(part_dq, sel, cu_q, cu_chunks, dq, B, total_q, H, h0, Hw, topk).launch(
            grid=(nblocks, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, part_dq: cute.Pointer, sel: cute.Pointer, cu_q: cute.Pointer, cu_chunks: cute.Pointer,
               dq: cute.Pointer, B: Int32, total_q: Int32, H: Int32, h0: Int32, Hw: Int32, topk: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        GS = self.GS
        D = self.D
        gl = bid * (THREADS // GS) + tid // GS  # (row, head of the window)
        lane = tid % GS
        if gl < total_q * Hw:
            i = gl // Hw
            g = i * H + h0 + (gl - i * Hw)  # (row, head)
            b = find_segment(cu_q, B, i)
            qs, qe = clamp_seq(cu_q, b, total_q)
            nb = Int32(0)  # chunks of the row's sequence; 0 outside every sequence
            if (i >= qs) & (i < qe):
                nb = _t(cu_chunks)[b + 1] - _t(cu_chunks)[b]
            tsel = _t(sel)
            for v in cutlass.range_constexpr(self.NV):
                col = (v * GS + lane) * 8
                acc = cute.make_rmem_tensor(cute.make_layout(8), Float32)
                acc.fill(0.0)
                if nb > 0:
                    for s in cutlass.range(topk, unroll=2):
                        j = tsel[Int64(g) * Int64(topk) + Int64(s)]
                        if (j >= 0) & (j < nb):
                            po = (Int64(gl) * Int64(topk) + Int64(s)) * Int64(D) + Int64(col)
                            x = cute.make_tensor(part_dq + cute.assume(po, divby=8), cute.make_layout(8)).load()
                            acc.store(acc.load() + x.to(Float32))
                off = Int64(g) * Int64(D) + Int64(col)
                cute.make_tensor(dq + cute.assume(off, divby=8), cute.make_layout(8)).store(acc.load().to(self.dtype))


class ZeroKernel:
    """``buf[0:n] = 0`` for an Int32 buffer (the sm90 backward's dQ-chain semaphores, reset per
    call in the call's stream, so a CUDA graph replays it too). Compile key: ("zero32",)."""

    @cute.jit
    def __call__(self, buf: cute.Pointer, n: Int32, nblocks: Int32, stream: cuda.CUstream):
        self.kernel(buf, n).launch(grid=(nblocks, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, buf: cute.Pointer, n: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        nb, _, _ = cute.arch.grid_dim()
        tb = _t(buf)
        for i in cutlass.range(bid * THREADS + tid, n, nb * THREADS, unroll=1):
            tb[i] = Int32(0)
