"""Per-slot key-major index for the slot-pass MoBA forward (CuTe DSL).

For every gather pass ``s' = s - s0`` (``s0 = 1`` causal: slot 0, the own chunk, is handled by
the dense diagonal pass; ``s0 = 0`` non-causal) the forward needs the rows that chose each
(global chunk g, head h) in routing slot ``s``. Segments are numbered
``seg' = s' * nseg + g * H + h`` (``nseg = num_chunks_bound * H``), so one pass's segments are
contiguous.

:class:`SlotIndexKernel` runs one thread per (row, head) and is launched twice:

* ``scatter=False``: ``nused[row, head]`` = number of leading usable slots (``0 <= chunk <
  chunks of the row's sequence``; the first unusable slot ends the list), ``counts[seg'] += 1``
  for every gather slot (integer atomics: counts are exact), and, non-causal only, rows with no
  usable slot get ``out = 0``, ``lse = -inf`` (causal empty rows are written by the diagonal
  pass, which covers every row).
* ``scatter=True``: after the host's exclusive scan (``offsets``; ``cursor = offsets[:-1]``),
  ``rows_list[atomic_add(cursor[seg'], 1)] = row``.

The order of rows inside a segment depends on timing, but the forward's result for a row does
not depend on its place in a tile, so the output is still bitwise deterministic. Everything is
clamped: garbage ``cu_seqlens`` cannot make it write out of bounds.
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


class SlotIndexKernel:
    """Compile key: ("slotidx", scatter, causal, dtype_name, head_dim)."""

    def __init__(self, scatter: bool, causal: bool, dtype, head_dim: int):
        self.scatter = bool(scatter)
        self.causal = bool(causal)
        self.dtype = dtype
        self.D = head_dim
        self.nthr = THREADS

    @cute.jit
    def __call__(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        rows_list: cute.Pointer,
        nused: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
        nblocks: Int32,
        stream: cuda.CUstream,
    ):
        self.kernel(sel, cu_q, cu_chunks, counts, rows_list, nused, out, lse, B, total_q, H, topk, nseg).launch(
            grid=(nblocks, 1, 1), block=(self.nthr, 1, 1), stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        rows_list: cute.Pointer,
        nused: cute.Pointer,
        out: cute.Pointer,
        lse: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        idx = bid * self.nthr + tid
        s0 = 1 if cutlass.const_expr(self.causal) else 0
        if idx < total_q * H:
            i = idx // H
            h = idx - i * H
            tsel = _t(sel + Int64(idx) * Int64(topk))
            tcc = _t(cu_chunks)
            b = find_segment(cu_q, B, i)
            qs, qe = clamp_seq(cu_q, b, total_q)
            nb = Int32(0)
            cc0 = Int32(0)
            if (i >= qs) & (i < qe):
                cc0 = tcc[b]
                nb = tcc[b + 1] - cc0
            nu = Int32(0)
            for s in cutlass.range(topk):
                j = tsel[s]
                if (nu == s) & (j >= 0) & (j < nb):
                    nu = nu + 1
            if cutlass.const_expr(not self.scatter):
                _t(nused)[idx] = nu
                if cutlass.const_expr(not self.causal):
                    if nu == 0:
                        D = self.D
                        tout = cute.make_tensor(out + Int64(idx) * Int64(D), cute.make_layout(D))
                        for d in cutlass.range(D):
                            tout[d] = self.dtype(0.0)
                        _t(lse)[Int64(h) * Int64(total_q) + Int64(i)] = -Float32.inf
            for s in cutlass.range(s0, nu):
                seg = (s - s0) * nseg + (cc0 + tsel[s]) * H + h
                if cutlass.const_expr(self.scatter):
                    pos = cute.arch.atomic_add((counts + seg).llvm_ptr, Int32(1))
                    _t(rows_list)[pos] = i
                else:
                    cute.arch.atomic_add((counts + seg).llvm_ptr, Int32(1))
