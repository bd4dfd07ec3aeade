"""Chunk bookkeeping and chunk centroids (CuTe DSL).

Two kernels:

* :class:`ChunkPrepKernel` (one CTA): from ``cu_seqlens_q/k`` (clamped, so any values are
  memory safe) computes ``cu_chunks`` (global chunk numbering of :mod:`moba_cute.routing`),
  ``cu_mtiles`` (the flattened query-tile numbering used by the top-k kernel), ``cu_kblocks``
  (key-major row blocks) and ``tbase`` (per-sequence bases of the key-major count table). All
  are clamped to the host-known bounds, so no later kernel can index past its buffers.
* :class:`CentroidsKernel`: one CTA per (global chunk, KV head). Sums the chunk's real keys in
  fp32 (fixed order, deterministic), divides by the real length, writes the fp32 centroid
  ``(num_chunks_bound, Hk, D)`` and its hi/lo split in the input dtype, laid out
  ``(Hk, num_chunks_bound, D)`` for the top-k kernel (``c ~= hi + lo`` to ~2^-16 relative).
  It also zeroes the key-major segment counters of its chunk (the column-scan kernel
  overwrites them; kept for callers that only count).
  Chunks past ``cu_chunks[B]`` get zeros.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, Int64, Float32

PREP_THREADS = 256
CENTROID_UNROLL = 4  # key rows per thread in flight (2, 8, 16: same time on an H200, DRAM bound)


def _gt(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


@cute.jit
def clamp_seq(cu: cute.Pointer, b: Int32, total: Int32):
    """(start, end) of sequence ``b`` from a cu_seqlens pointer, clamped to ``[0, total]``."""
    t = cute.make_tensor(cu, cute.make_layout(1 << 30))
    s = t[b]
    e = t[b + 1]
    s = cutlass.min(cutlass.max(s, Int32(0)), total)
    e = cutlass.min(cutlass.max(e, s), total)
    return s, e


@cute.jit
def find_segment(cu: cute.Pointer, n: Int32, x: Int32):
    """Largest ``b`` in ``[0, n)`` with ``cu[b] <= x`` (0 if none); binary search."""
    t = cute.make_tensor(cu, cute.make_layout(1 << 30))
    lo = Int32(0)
    hi = n - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if t[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    return lo


@cute.jit
def chunk_partial_sums(base: cute.Pointer, row_stride: Int64, length: Int32, ty: Int32, cv: Int32,
                       R: cutlass.Constexpr, D: cutlass.Constexpr, unroll: cutlass.Constexpr, sred: cute.Tensor):
    """The first step of a chunk's fp32 key sum in a fixed order: thread (``ty``, ``cv``) adds
    the 16-byte pieces ``cv`` of rows ``ty, ty + R, ...`` below ``length`` (from ``base``, which
    points at piece ``cv`` of the first row; ``row_stride`` in elements, whole 16-byte pieces)
    and stores its 8 sums at ``sred[ty * D + cv * 8 :]``. The caller syncs and adds the ``R``
    partial rows."""
    acc = cute.make_rmem_tensor(cute.make_layout(8), Float32)
    acc.fill(0.0)
    for t in cutlass.range(ty, length, R, unroll=unroll):
        src = cute.make_tensor(base + cute.assume(Int64(t) * row_stride, divby=8), cute.make_layout(8))
        acc.store(acc.load() + src.load().to(Float32))
    for e in cutlass.range_constexpr(8):
        sred[ty * D + cv * 8 + e] = acc[e]


@cute.jit
def block_exclusive_scan(val: Int32, s_warp: cute.Tensor, tid: Int32, nwarps: cutlass.Constexpr):
    """Exclusive prefix sum of ``val`` over the CTA (1-D, ``32 * nwarps`` threads) and the total.

    ``s_warp`` is an Int32 shared tensor with at least ``nwarps + 1`` entries. Contains barriers.
    """
    lane = tid % 32
    warp = tid // 32
    x = val
    for i in cutlass.range_constexpr(5):
        off = 1 << i
        y = cute.arch.shuffle_sync_up(x, off)
        if lane >= off:
            x = x + y
    if lane == 31:
        s_warp[warp] = x
    cute.arch.sync_threads()
    if tid == 0:
        acc = Int32(0)
        for w in cutlass.range_constexpr(nwarps):
            v = s_warp[w]
            s_warp[w] = acc
            acc = acc + v
        s_warp[nwarps] = acc
    cute.arch.sync_threads()
    res = s_warp[warp] + x - val
    total = s_warp[nwarps]
    cute.arch.sync_threads()
    return res, total


@cute.jit
def seq_counts(cu_q: cute.Pointer, cu_k: cute.Pointer, b: Int32, total_q: Int32, total_k: Int32,
               chunk_size: Int32, group: Int32, rows_per_tile: Int32, km_rows: Int32):
    """(chunks, query tiles, key-major blocks, count-table entries) of sequence b."""
    ks, ke = clamp_seq(cu_k, b, total_k)
    qs, qe = clamp_seq(cu_q, b, total_q)
    nc = (ke - ks + chunk_size - 1) // chunk_size
    rows = Int64(qe - qs) * Int64(group)
    nm = Int32((rows + Int64(rows_per_tile - 1)) // Int64(rows_per_tile))
    nk = (qe - qs + km_rows - 1) // km_rows
    return nc, nm, nk, Int64(nk) * Int64(nc)


@cute.jit
def warp_sat_scan(x: Int32, lane: Int32, cap: Int32):
    """Inclusive prefix sum over the warp of non-negative ``x``, saturated at ``cap``
    (= min(exact prefix, cap); 64-bit adds, so no overflow)."""
    for i in cutlass.range_constexpr(5):
        off = 1 << i
        y = cute.arch.shuffle_sync_up(x, off)
        if lane >= off:
            x = Int32(cutlass.min(Int64(x) + Int64(y), Int64(cap)))
    return x


@cute.jit
def warp_excl(incl: Int32, lane: Int32):
    """Exclusive prefix from an inclusive one (lane 0: 0)."""
    e = cute.arch.shuffle_sync_up(incl, 1)
    if lane == 0:
        e = Int32(0)
    return e


class ChunkPrepKernel:
    """cu_chunks, cu_mtiles, cu_kblocks (B+1 each) and the count-table bases ``tbase`` (B+1) in
    one CTA. Compile key: ("prep", arch)."""

    def __init__(self):
        self.nthr = PREP_THREADS

    @cute.jit
    def __call__(
        self,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cu_mtiles: cute.Pointer,
        cu_kblocks: cute.Pointer,
        tbase: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        chunk_size: Int32,
        group: Int32,
        rows_per_tile: Int32,
        chunk_bound: Int32,
        mtile_bound: Int32,
        km_rows: Int32,
        kb_bound: Int32,
        tb_bound: Int32,
        stream: cuda.CUstream,
    ):
        self.kernel(
            cu_q, cu_k, cu_chunks, cu_mtiles, cu_kblocks, tbase, B, total_q, total_k, chunk_size, group,
            rows_per_tile, chunk_bound, mtile_bound, km_rows, kb_bound, tb_bound,
        ).launch(grid=(1, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cu_mtiles: cute.Pointer,
        cu_kblocks: cute.Pointer,
        tbase: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        chunk_size: Int32,
        group: Int32,
        rows_per_tile: Int32,
        chunk_bound: Int32,
        mtile_bound: Int32,
        km_rows: Int32,
        kb_bound: Int32,
        tb_bound: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        nthr = self.nthr
        smem = cutlass.utils.SmemAllocator()
        s_a = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        s_b = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        s_c = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        s_d = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        oc = cute.make_tensor(cu_chunks, cute.make_layout(1 << 30))
        om = cute.make_tensor(cu_mtiles, cute.make_layout(1 << 30))
        ok = cute.make_tensor(cu_kblocks, cute.make_layout(1 << 30))
        ot = cute.make_tensor(tbase, cute.make_layout(1 << 30))
        per = (B + nthr - 1) // nthr
        b0 = tid * per
        b1 = cutlass.min(b0 + per, B)
        sc = Int32(0)
        sm = Int32(0)
        sk = Int32(0)
        st = Int64(0)
        for b in cutlass.range(b0, b1, 1):
            nc, nm, nk, ntb = seq_counts(cu_q, cu_k, b, total_q, total_k, chunk_size, group, rows_per_tile, km_rows)
            sc = sc + nc
            sm = sm + nm
            sk = sk + nk
            st = st + ntb
        # table partial sums saturate just above the bound (valid inputs never reach it; the
        # consumers check every table row against the bound)
        st32 = Int32(cutlass.min(st, Int64(tb_bound) + Int64(1)))
        pc, _tc = block_exclusive_scan(sc, s_a, tid, nthr // 32)
        pm, _tm = block_exclusive_scan(sm, s_b, tid, nthr // 32)
        pk, _tk = block_exclusive_scan(sk, s_c, tid, nthr // 32)
        pt, _tt = block_exclusive_scan(st32, s_d, tid, nthr // 32)
        pt64 = Int64(pt)
        for b in cutlass.range(b0, b1, 1):
            oc[b] = cutlass.min(pc, chunk_bound)
            om[b] = cutlass.min(pm, mtile_bound)
            ok[b] = cutlass.min(pk, kb_bound)
            ot[b] = Int32(cutlass.min(pt64, Int64(tb_bound) + Int64(1)))
            nc, nm, nk, ntb = seq_counts(cu_q, cu_k, b, total_q, total_k, chunk_size, group, rows_per_tile, km_rows)
            pc = pc + nc
            pm = pm + nm
            pk = pk + nk
            pt64 = pt64 + ntb
        if tid == nthr - 1:
            oc[B] = cutlass.min(pc, chunk_bound)
            om[B] = cutlass.min(pm, mtile_bound)
            ok[B] = cutlass.min(pk, kb_bound)
            ot[B] = Int32(cutlass.min(pt64, Int64(tb_bound) + Int64(1)))
        if B == 0:
            if tid == 0:
                oc[0] = Int32(0)
                om[0] = Int32(0)
                ok[0] = Int32(0)
                ot[0] = Int32(0)


class CentroidsKernel:
    """Per-(chunk, KV head) key mean. Compile keys: ("centroids", dtype, head_dim, arch) and,
    for the ``self_prep`` variant, ("centroids_prep", dtype, head_dim, arch).

    ``self_prep`` (batches of <= ``configs.routing.PREP_FUSED_MAX_SEQS`` = 32 sequences): no
    :class:`ChunkPrepKernel` launch. Every CTA finds its chunk's sequence with a warp scan of the
    per-sequence chunk counts (one lane per sequence), and warp 0 of CTA 0 writes the prep's
    outputs (same values, same clamping) for the later kernels. Saves a launch and, for a
    single timed call, the host's launch gap between the two kernels (~40 us on an H200: the
    GPU finishes the 2 us prep kernel long before the next launch arrives)."""

    def __init__(self, dtype, head_dim: int, self_prep: bool = False):
        self.dtype = dtype
        self.D = head_dim
        assert head_dim % 8 == 0
        self.cv = head_dim // 8  # 16-byte column vectors per row
        rows = max(1, 128 // self.cv)
        while (self.cv * rows) % 32 and rows > 1:
            rows -= 1  # whole warps (the self-prep path shuffles with full masks)
        self.rows = rows  # row lanes
        self.nthr = self.cv * self.rows
        assert self.nthr % 32 == 0
        self.self_prep = self_prep

    @cute.jit
    def __call__(
        self,
        k: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cent: cute.Pointer,
        c_hi: cute.Pointer,
        c_lo: cute.Pointer,
        counts: cute.Pointer,
        cu_q: cute.Pointer,
        cu_mtiles: cute.Pointer,
        cu_kblocks: cute.Pointer,
        tbase: cute.Pointer,
        B: Int32,
        total_k: Int32,
        Hk: Int32,
        H: Int32,
        chunk_size: Int32,
        chunk_bound: Int32,
        total_q: Int32,
        group: Int32,
        rows_per_tile: Int32,
        mtile_bound: Int32,
        km_rows: Int32,
        kb_bound: Int32,
        tb_bound: Int32,
        stream: cuda.CUstream,
    ):
        self.kernel(
            k, cu_k, cu_chunks, cent, c_hi, c_lo, counts, cu_q, cu_mtiles, cu_kblocks, tbase, B, total_k, Hk, H,
            chunk_size, chunk_bound, total_q, group, rows_per_tile, mtile_bound, km_rows, kb_bound, tb_bound,
        ).launch(grid=(chunk_bound * Hk, 1, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        k: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cent: cute.Pointer,
        c_hi: cute.Pointer,
        c_lo: cute.Pointer,
        counts: cute.Pointer,
        cu_q: cute.Pointer,
        cu_mtiles: cute.Pointer,
        cu_kblocks: cute.Pointer,
        tbase: cute.Pointer,
        B: Int32,
        total_k: Int32,
        Hk: Int32,
        H: Int32,
        chunk_size: Int32,
        chunk_bound: Int32,
        total_q: Int32,
        group: Int32,
        rows_per_tile: Int32,
        mtile_bound: Int32,
        km_rows: Int32,
        kb_bound: Int32,
        tb_bound: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        gflat, _, _ = cute.arch.block_idx()
        # KV head fastest: the Hk CTAs of a chunk read adjacent pieces of the same key rows
        # together (DRAM page locality); the host keeps chunk_bound * Hk < 2^31
        g = gflat // Hk
        hk = gflat - g * Hk
        D = self.D
        CV = self.cv
        R = self.rows
        smem = cutlass.utils.SmemAllocator()
        sred = smem.allocate_tensor(Float32, cute.make_layout(R * D), 16)

        # zero the key-major counters of this chunk (segments g*H .. g*H+H-1)
        if hk == 0:
            cnt = cute.make_tensor(counts + Int64(g) * Int64(H), cute.make_layout(1 << 30))
            for i in cutlass.range(tid, H, self.nthr):
                cnt[i] = Int32(0)

        length = Int32(0)
        start = Int64(0)
        found = Int32(0)  # (seq, j): this CTA's chunk is chunk j of sequence seq
        seq = Int32(0)
        j = Int32(0)
        if cutlass.const_expr(self.self_prep):
            # one lane per sequence (the host uses this variant for B <= 32)
            lane = tid % 32
            nc = Int32(0)
            nm = Int32(0)
            nk = Int32(0)
            ntb = Int64(0)
            if lane < B:
                nc, nm, nk, ntb = seq_counts(cu_q, cu_k, lane, total_q, total_k, chunk_size, group, rows_per_tile,
                                             km_rows)
            inc_c = warp_sat_scan(nc, lane, chunk_bound)
            if (gflat == 0) & (tid < 32):
                # the prep kernel's outputs: exclusive prefixes clamped to the host bounds
                tb1 = tb_bound + 1
                inc_m = warp_sat_scan(nm, lane, mtile_bound)
                inc_k = warp_sat_scan(nk, lane, kb_bound)
                inc_t = warp_sat_scan(Int32(cutlass.min(ntb, Int64(tb1))), lane, tb1)
                exc_c = warp_excl(inc_c, lane)
                exc_m = warp_excl(inc_m, lane)
                exc_k = warp_excl(inc_k, lane)
                exc_t = warp_excl(inc_t, lane)
                if lane < B:
                    _gt(cu_chunks)[lane] = exc_c
                    _gt(cu_mtiles)[lane] = exc_m
                    _gt(cu_kblocks)[lane] = exc_k
                    _gt(tbase)[lane] = exc_t
                if (lane == B - 1) | ((B == 0) & (lane == 0)):
                    last_c = Int32(0)
                    last_m = Int32(0)
                    last_k = Int32(0)
                    last_t = Int32(0)
                    if B > 0:
                        last_c = inc_c
                        last_m = inc_m
                        last_k = inc_k
                        last_t = inc_t
                    _gt(cu_chunks)[B] = last_c
                    _gt(cu_mtiles)[B] = last_m
                    _gt(cu_kblocks)[B] = last_k
                    _gt(tbase)[B] = last_t
            # this chunk's sequence: the number of sequences that end at or before it
            ends = cute.arch.vote_ballot_sync((lane < B) & (inc_c <= g))
            b = Int32(cute.arch.popc(ends))
            nch = Int32(0)
            if B > 0:
                nch = cute.arch.shuffle_sync(inc_c, B - 1)
            c0 = cute.arch.shuffle_sync(warp_excl(inc_c, lane), cutlass.min(b, Int32(31)))
            if g < nch:
                found = Int32(1)
                seq = b
                j = g - c0
        else:
            tcc = cute.make_tensor(cu_chunks, cute.make_layout(1 << 30))
            if B > 0:
                if g < tcc[B]:
                    found = Int32(1)
                    seq = find_segment(cu_chunks, B, g)
                    j = g - tcc[seq]
        # this chunk's keys: rows [start, start + length) of sequence seq (partial last chunk)
        if found != 0:
            ks, ke = clamp_seq(cu_k, seq, total_k)
            st = Int64(ks) + Int64(j) * Int64(chunk_size)
            rem = cutlass.max(Int64(ke) - st, Int64(0))
            length = Int32(cutlass.min(rem, Int64(chunk_size)))
            start = st

        ty = tid // CV
        cv = tid % CV
        row_stride = Int64(Hk) * Int64(D)
        # (offsets are whole 16-byte pieces: declared so, the pointers keep k's alignment and
        # the loads are 16 bytes wide without run-time address rounding)
        base = k + cute.assume(start * row_stride + Int64(hk) * Int64(D) + Int64(cv * 8), divby=8)
        chunk_partial_sums(base, row_stride, length, ty, cv, R, D, CENTROID_UNROLL, sred)
        cute.arch.sync_threads()
        for d in cutlass.range(tid, D, self.nthr):
            s = Float32(0.0)
            for r in cutlass.range_constexpr(R):
                s = s + sred[r * D + d]
            mean = Float32(0.0)
            if length > 0:
                mean = s / Float32(length)
            ob = Int64(g) * row_stride + Int64(hk) * Int64(D) + Int64(d)
            ocent = cute.make_tensor(cent + ob, cute.make_layout(1))
            ocent[0] = mean
            hi = mean.to(self.dtype)
            # (an infinite or NaN mean: hi carries it, lo is 0 rather than inf - inf = NaN, so
            # the score has the class (+-inf / NaN) of the reference's fp32 dot product)
            lo_f = mean - hi.to(Float32)
            lo = Float32(cutlass.select_(lo_f != lo_f, Float32(0.0), lo_f)).to(self.dtype)
            oh = Int64(hk) * Int64(chunk_bound) * Int64(D) + Int64(g) * Int64(D) + Int64(d)
            thi = cute.make_tensor(c_hi + oh, cute.make_layout(1))
            tlo = cute.make_tensor(c_lo + oh, cute.make_layout(1))
            thi[0] = hi
            tlo[0] = lo
