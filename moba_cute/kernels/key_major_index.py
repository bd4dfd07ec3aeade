"""Key-major routing index (CuTe DSL): the transpose of the query-major selection.

Deterministic by construction:

1. :class:`SegmentCountKernel` (``scatter=False``): ``counts[seg] += 1`` for every used
   selection slot (integer atomics: the totals do not depend on timing). ``counts`` was
   zeroed by the centroid kernel.
2. :class:`SegmentScanKernel` (one CTA): ``offsets`` = exclusive prefix sum of ``counts``
   (``offsets[0] = 0``) and a copy of it as the scatter cursor.
3. :class:`SegmentCountKernel` (``scatter=True``): each slot takes a place in its segment with
   an atomic cursor and writes its query row into a scratch buffer (order within a segment
   depends on timing here), and the tail ``query_rows[offsets[-1]:]`` is set to ``-1``.
4. :class:`SegmentSortKernel` (one CTA per segment): writes the segment's rows ascending into
   ``query_rows``: a shared-memory bitonic sort for segments up to 8192 rows, and for larger
   ones a shared-memory bitmap over windows of 2^18 rows of the sequence followed by an
   ordered compaction. A row appears at most once per segment, so the sorted order is unique
   and the output is bit-identical on every run.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, Int64, Uint32

from .centroids import block_exclusive_scan, clamp_seq, find_segment

COUNT_THREADS = 256
SCAN_THREADS = 1024
SORT_THREADS = 256
SORT_CAP = 8192  # rows sorted in shared memory; also the bitmap size in 32-bit words
INT_MAX = 2147483647


def _t(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


class SegmentCountKernel:
    """Count (or scatter) selection slots per segment. Key: ("kmcount", scatter, arch)."""

    def __init__(self, scatter: bool):
        self.scatter = scatter
        self.nthr = COUNT_THREADS

    @cute.jit
    def __call__(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        offsets: cute.Pointer,
        scratch: cute.Pointer,
        query_rows: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
        nblocks: Int32,
        stream: cuda.CUstream,
    ):
        self.kernel(
            sel, cu_q, cu_chunks, counts, offsets, scratch, query_rows, B, total_q, H, topk, nseg,
        ).launch(grid=(nblocks, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        sel: cute.Pointer,
        cu_q: cute.Pointer,
        cu_chunks: cute.Pointer,
        counts: cute.Pointer,
        offsets: cute.Pointer,
        scratch: cute.Pointer,
        query_rows: cute.Pointer,
        B: Int32,
        total_q: Int32,
        H: Int32,
        topk: Int32,
        nseg: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        idx = bid * self.nthr + tid
        nrow = total_q * H
        # lanes of a warp take 32 consecutive query rows of one head: rows that picked the same
        # chunk (always the own chunk, often popular past chunks) share one atomic per warp
        h = idx // cutlass.max(total_q, Int32(1))
        i = idx - h * total_q
        valid = idx < nrow
        tcc = _t(cu_chunks)
        cc0 = Int32(0)
        nb = Int32(0)
        if valid:
            b = find_segment(cu_q, B, i)
            qs, qe = clamp_seq(cu_q, b, total_q)
            if (i >= qs) & (i < qe):
                cc0 = tcc[b]
                nb = tcc[b + 1] - cc0
        tsel = _t(sel + (Int64(i) * Int64(H) + Int64(h)) * Int64(topk))
        lt = cute.arch.lanemask_lt()
        for s in cutlass.range(topk):
            j = Int32(-1)
            if nb > 0:
                j = tsel[s]
            seg = Int32(-1)
            if (j >= 0) & (j < nb):
                seg = (cc0 + j) * H + h
            m = cute.arch.match_sync(0xFFFFFFFF, seg)
            low = m & (~m + Uint32(1))
            leader = cute.arch.popc(low - Uint32(1))
            rank = cute.arch.popc(m & lt)
            base = Int32(0)
            if (seg >= 0) & (rank == 0):
                base = cute.arch.atomic_add((counts + seg).llvm_ptr, Int32(cute.arch.popc(m)))
            if cutlass.const_expr(self.scatter):
                base = cute.arch.shuffle_sync(base, Int32(leader))
                if seg >= 0:
                    tsc = _t(scratch)
                    tsc[base + Int32(rank)] = i
        if cutlass.const_expr(self.scatter):
            if valid:
                total = _t(offsets)[nseg]
                tq = _t(query_rows + Int64(idx) * Int64(topk))
                for s in cutlass.range(topk):
                    e = Int64(idx) * Int64(topk) + Int64(s)
                    if e >= Int64(total):
                        tq[s] = Int32(-1)


class SegmentScanKernel:
    """offsets = exclusive scan(counts); cursor = offsets[:-1]. One CTA. Key: ("kmscan", arch)."""

    def __init__(self):
        self.nthr = SCAN_THREADS

    @cute.jit
    def __call__(self, counts: cute.Pointer, offsets: cute.Pointer, cursor: cute.Pointer,
                 nseg: Int32, stream: cuda.CUstream):
        self.kernel(counts, offsets, cursor, nseg).launch(
            grid=(1, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, counts: cute.Pointer, offsets: cute.Pointer, cursor: cute.Pointer, nseg: Int32):
        tid, _, _ = cute.arch.thread_idx()
        smem = cutlass.utils.SmemAllocator()
        s_w = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        tc = _t(counts)
        to = _t(offsets)
        tcur = _t(cursor)
        V = 4
        step = self.nthr * V
        carry = Int32(0)
        for base in cutlass.range(0, nseg, step):
            i0 = base + tid * V
            vals = cute.make_rmem_tensor(cute.make_layout(V), Int32)
            local = Int32(0)
            for v in cutlass.range_constexpr(V):
                x = Int32(0)
                if i0 + v < nseg:
                    x = tc[i0 + v]
                vals[v] = x
                local = local + x
            pre, tot = block_exclusive_scan(local, s_w, tid, self.nthr // 32)
            run = carry + pre
            for v in cutlass.range_constexpr(V):
                if i0 + v < nseg:
                    to[i0 + v] = run
                    tcur[i0 + v] = run
                run = run + vals[v]
            carry = carry + tot
        if tid == 0:
            to[nseg] = carry


class SegmentSortKernel:
    """Ascending rows per segment, scratch -> query_rows. Key: ("kmsort", arch)."""

    def __init__(self):
        self.nthr = SORT_THREADS

    @cute.jit
    def __call__(self, scratch: cute.Pointer, offsets: cute.Pointer, query_rows: cute.Pointer,
                 cu_q: cute.Pointer, cu_chunks: cute.Pointer, B: Int32, total_q: Int32, H: Int32,
                 nseg: Int32, stream: cuda.CUstream):
        self.kernel(scratch, offsets, query_rows, cu_q, cu_chunks, B, total_q, H).launch(
            grid=(nseg, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, scratch: cute.Pointer, offsets: cute.Pointer, query_rows: cute.Pointer,
               cu_q: cute.Pointer, cu_chunks: cute.Pointer, B: Int32, total_q: Int32, H: Int32):
        tid, _, _ = cute.arch.thread_idx()
        seg, _, _ = cute.arch.block_idx()
        NT = self.nthr
        smem = cutlass.utils.SmemAllocator()
        buf = smem.allocate_tensor(Int32, cute.make_layout(SORT_CAP), 16)
        s_w = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        to = _t(offsets)
        o = to[seg]
        n = to[seg + 1] - o
        src = _t(scratch + Int64(o))
        dst = _t(query_rows + Int64(o))
        if n == 1:
            if tid == 0:
                dst[0] = src[0]
        if (n > 1) & (n <= SORT_CAP):
            N = Int32(2)
            while N < n:
                N = N * 2
            for i in cutlass.range(tid, N, NT):
                x = Int32(INT_MAX)
                if i < n:
                    x = src[i]
                buf[i] = x
            cute.arch.sync_threads()
            kk = Int32(2)
            while kk <= N:
                jj = kk >> 1
                while jj > 0:
                    for i in cutlass.range(tid, N >> 1, NT):
                        lo = ((i & ~(jj - 1)) << 1) | (i & (jj - 1))
                        hi = lo + jj
                        a = buf[lo]
                        c = buf[hi]
                        asc = (lo & kk) == 0
                        sw = (asc & (a > c)) | ((~asc) & (a < c))
                        if sw:
                            buf[lo] = c
                            buf[hi] = a
                    cute.arch.sync_threads()
                    jj = jj >> 1
                kk = kk << 1
            for i in cutlass.range(tid, n, NT):
                dst[i] = buf[i]
        if n > SORT_CAP:
            W = SORT_CAP * 32
            WPT = SORT_CAP // NT  # words per thread
            g = seg // H
            b = find_segment(cu_chunks, B, g)
            qs, qe = clamp_seq(cu_q, b, total_q)
            outp = Int32(0)
            for w0 in cutlass.range(qs, qe, W):
                for i in cutlass.range(tid, SORT_CAP, NT):
                    buf[i] = Int32(0)
                cute.arch.sync_threads()
                for e in cutlass.range(tid, n, NT):
                    d = src[e] - w0
                    if (d >= 0) & (d < W):
                        cute.arch.atomic_or((buf.iterator + (d >> 5)).llvm_ptr, Int32(1) << (d & 31))
                cute.arch.sync_threads()
                cnt = Int32(0)
                for w in cutlass.range_constexpr(WPT):
                    cnt = cnt + cute.arch.popc(buf[tid * WPT + w])
                pre, tot = block_exclusive_scan(cnt, s_w, tid, NT // 32)
                k = outp + pre
                for w in cutlass.range(WPT):
                    word = buf[tid * WPT + w]
                    if word != 0:
                        for bit in cutlass.range_constexpr(32):
                            if ((word >> bit) & 1) != 0:
                                dst[k] = w0 + (tid * WPT + w) * 32 + bit
                                k = k + 1
                outp = outp + tot
                cute.arch.sync_threads()
