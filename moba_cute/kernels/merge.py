"""Row-wise merge of the sm90 segment forward's partials (non-causal calls; causal ones merge
in the diagonal kernel): for every (row, head) with ``nused > 0`` slots,

    M = max_j L_j,  w_j = 2^(L_j - M),  out = sum_j w_j o_j / sum_j w_j,
    lse = (M + log2 sum_j w_j) * ln 2

over its normalized partials ``o_j = part_o[((h - h0) * total_q + row - row_lo) * KP + j]``
and their log2-domain LSEs ``L_j = part_lse[...]``, ``j`` in slot order (bitwise
deterministic); a launch merges the window whose partials the buffer holds: ``rows`` (head,
row) pairs in head-major order from head ``h0``, row ``row_lo`` (windows of heads: ``total_q *``
the window's heads from row 0; windows of query rows: rows ``row_lo ..`` of head ``h0``). One
warp per (row, head), ``D / 32`` contiguous elements per lane. Rows with no usable slot were
written (0, -inf) by the index's count kernel and are skipped.
Compile key: ("merge", dtype, D).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Float32, Int32, Int64

from .moba_fwd_sm80 import _flat as _t, partials_max

THREADS = 256
LN2 = 0.6931471805599453


def grid_blocks(rows: int) -> int:
    return max(1, (rows * 32 + THREADS - 1) // THREADS)


class MergeKernel:
    def __init__(self, dtype, head_dim: int):
        assert head_dim % 32 == 0
        self.dtype = dtype
        self.D = head_dim
        self.VEC = head_dim // 32

    @cute.jit
    def __call__(self, part_o: cute.Pointer, part_lse: cute.Pointer, nused: cute.Pointer, out: cute.Pointer,
                 lse: cute.Pointer, rows: Int32, total_q: Int32, H: Int32, KP: Int32, h0: Int32, row_lo: Int32,
                 nblocks: Int32, stream: cuda.CUstream):
        self.kernel(part_o, part_lse, nused, out, lse, rows, total_q, H, KP, h0, row_lo).launch(
            grid=(nblocks, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, part_o: cute.Pointer, part_lse: cute.Pointer, nused: cute.Pointer, out: cute.Pointer,
               lse: cute.Pointer, rows: Int32, total_q: Int32, H: Int32, KP: Int32, h0: Int32, row_lo: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        lane = tid % 32
        w = bid * (THREADS // 32) + tid // 32
        VEC = self.VEC
        if w < rows:
            # warp w: row i of head h (the window's partials are head-major)
            u = w + row_lo
            hl = u // total_q
            i = u - hl * total_q
            h = h0 + hl
            ridx = i * H + h
            nu = _t(nused)[ridx]
            if nu > 0:
                tpl = _t(part_lse)
                pbase = Int64(w) * Int64(KP)
                M, M_use = partials_max(tpl, pbase, nu, 1)
                acc = cute.make_rmem_tensor(cute.make_layout(VEC), Float32)
                acc.fill(0.0)
                wsum = Float32(0.0)
                for j in cutlass.range(nu, unroll=1):
                    wj = cute.math.exp2(tpl[pbase + Int64(j)] - M_use, fastmath=True)
                    wsum = wsum + wj
                    src = part_o + (pbase + Int64(j)) * Int64(self.D) + Int64(lane * VEC)
                    x = cute.make_rmem_tensor(cute.make_layout(VEC), self.dtype)
                    cute.autovec_copy(cute.make_tensor(src.align(VEC * 2), cute.make_layout(VEC)), x)
                    acc.store(acc.load() + wj * x.load().to(Float32))
                inv = Float32(0.0)
                if (wsum > Float32(0.0)) | (wsum != wsum):  # NaN propagates
                    inv = cute.arch.rcp_approx(wsum)
                y = cute.make_rmem_tensor(cute.make_layout(VEC), self.dtype)
                y.store((acc.load() * inv).to(self.dtype))
                dst = out + Int64(ridx) * Int64(self.D) + Int64(lane * VEC)
                cute.autovec_copy(y, cute.make_tensor(dst.align(VEC * 2), cute.make_layout(VEC)))
                if lane == 0:
                    val = -Float32.inf
                    if (wsum > Float32(0.0)) | (wsum != wsum):  # NaN propagates
                        val = (M_use + cute.math.log2(wsum, fastmath=False)) * LN2
                    _t(lse)[Int64(h) * Int64(total_q) + Int64(i)] = val
