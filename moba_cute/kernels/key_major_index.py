"""Key-major routing index (CuTe DSL): the transpose of the query-major selection.

Deterministic by construction, no global atomics and no sort. The query rows of each
(sequence, query head) are cut into *blocks* of ``km_rows`` consecutive rows (a host-chosen
power of two >= 512, so that the count table below stays within the selection's size). A
count table ``T[h][block][chunk]`` (per sequence ``ceil(Sq/km_rows) * ceil(Sk/C)`` entries;
per-sequence bases ``tbase`` from the prep kernel) holds how many rows of a block selected a
chunk.

1. :class:`BlockCountKernel` (one CTA per block and head): shared-memory histogram over the
   sequence's chunks (warp-aggregated runs + shared atomics: integer sums, so the
   result does not depend on timing) -> its row of ``T`` (zeros included).
2. :class:`ColumnScanKernel` (32 chunks x 8 block ranges per CTA, per head): turns each
   chunk's column of ``T`` (its blocks in row order) into its exclusive prefix sum (where the
   block's rows start inside the segment) and writes the segment's count.
3. :class:`SegmentScanKernel` (one CTA per head): ``offsets`` = exclusive prefix sum of the
   counts, and a head-major copy for the write pass.
4. :class:`BlockWriteKernel` (one CTA per block and head): processes its rows in groups of
   256 in row order. Per group, a shared bitmap ``bits[chunk][warp]`` of the rows that chose
   each chunk (``atomic_or`` of warp run masks: order independent); a row's place in its
   segment is ``offsets[seg] + T + (rows of earlier groups) + popc(bits of earlier warps) +
   popc(own warp's bits below the lane)``, so every segment comes out ascending with no sort.
   The entries go through a shared-memory stage grouped by chunk, so the stores are runs.
   Chunks are handled in windows of ``WRITE_WIN`` (shared memory). The kernel also writes
   ``-1`` to ``query_rows[offsets[-1]:]``.

Memory safety with arbitrary ``cu_seqlens``: table rows are only touched when they lie
inside the host's table bound, and every ``query_rows`` store is bounds-checked.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, Int64, Uint32

from .centroids import block_exclusive_scan, clamp_seq, find_segment

KM_THREADS = 256
WRITE_THREADS = 256  # rows per group of the write pass
COUNT_WIN = 8192  # chunks per shared-memory histogram window (32 KB)
WRITE_WIN = 512  # chunks per window of the write pass (bits + prefixes: 32 KB)
# the write pass's per-(warp, chunk) stage starts fit 16 bits (< 256 rows x topk <= 64 = 16384);
# 16-bit entries halve that array and its bank conflicts (H200 64K: write pass 145 -> 130 us)
LPRE_T = cutlass.Int16
WRITE_MIN_CTAS = 4
WRITE_STAGE = 2048  # entries staged per group of the write pass (rows + destinations: 16 KB)
COLSCAN_SEGS = 8  # warps per column-scan CTA, each scanning 1/8 of the blocks
SCAN_THREADS = 512
SCAN_CPT = 4  # consecutive chunks per thread and round of the segment scan
SEL_BATCH = 16  # selection slots loaded per batch (registers); topk <= 16 is one batch
FULL = 0xFFFFFFFF


def _t(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


@cute.jit
def _load_sel(tsel: cute.Tensor, vals: cute.Tensor, valid, s0: Int32, topk: Int32, vec: cutlass.Constexpr):
    """Slots ``s0 .. s0+SEL_BATCH-1`` of a selection row into registers (``-1`` past the row or
    for an invalid row): independent loads, issued back to back. ``vec`` (compiled for
    ``topk % 4 == 0``, where every row is 16-byte aligned): 16-byte loads; a scalar load per
    slot makes every lane fetch its row's sector once per slot (4-8x the L1/L2 sectors)."""
    if cutlass.const_expr(vec):
        for u in cutlass.range_constexpr(0, SEL_BATCH, 4):
            if valid & (s0 + u < topk):
                v4 = cute.make_tensor((tsel.iterator + (s0 + u)).align(16), cute.make_layout(4)).load()
                for k in cutlass.range_constexpr(4):
                    vals[u + k] = v4[k]
            else:
                for k in cutlass.range_constexpr(4):
                    vals[u + k] = Int32(-1)
    else:
        for u in cutlass.range_constexpr(SEL_BATCH):
            v = Int32(-1)
            if valid & (s0 + u < topk):
                v = tsel[s0 + u]
            vals[u] = v


@cute.jit
def _load_column(col: cute.Tensor, vals: cute.Tensor, ib: Int32, i1: Int32, nb: Int32):
    """Blocks ``ib .. ib+len(vals)-1`` (< ``i1``, else 0) of a count-table column (stride ``nb``):
    independent loads, issued back to back."""
    for u in cutlass.range_constexpr(cute.size(vals)):
        vals[u] = Int32(0)
        if ib + u < i1:
            vals[u] = col[(ib + u) * nb]


@cute.jit
def _run_mask(jw: Int32, lane: Int32):
    """Warp-aggregation without ``match.any``: lanes are consecutive rows, so equal chunk ids
    of one slot mostly come in runs. Returns (1 if this lane leads its run of equal ``jw``
    else 0, the lane mask of the run). Equal values in separate runs just make separate
    (commutative) shared-memory atomics."""
    prev = cute.arch.shuffle_sync_up(jw, 1)
    lead = Int32(0)
    if (lane == 0) | (prev != jw):
        lead = Int32(1)
    leads = Uint32(cute.arch.vote_ballot_sync(lead != 0))
    above = leads & ~((Uint32(2) << Uint32(lane)) - Uint32(1))
    nxt = above & (~above + Uint32(1))
    run = (nxt - Uint32(1)) & ~((Uint32(1) << Uint32(lane)) - Uint32(1))
    return lead, Int32(run)


@cute.jit
def _block_geom(cu_q: cute.Pointer, cu_chunks: cute.Pointer, cu_kblocks: cute.Pointer, tbase: cute.Pointer,
                B: Int32, total_q: Int32, km_rows: Int32, tb_bound: Int32, blk: Int32):
    """(ok, b, i, r0, nrows, cc0, nb, tb) of key-major block ``blk`` (ok = 0: nothing to do)."""
    tkb = _t(cu_kblocks)
    tcc = _t(cu_chunks)
    ok = Int32(0)
    b = Int32(0)
    i = Int32(0)
    r0 = Int32(0)
    nrows = Int32(0)
    cc0 = Int32(0)
    nb = Int32(0)
    tb = Int32(0)
    nkb = Int32(0)
    if B > 0:
        nkb = tkb[B]
    if blk < nkb:
        b = find_segment(cu_kblocks, B, blk)
        i = blk - tkb[b]
        qs, qe = clamp_seq(cu_q, b, total_q)
        r0 = qs + i * km_rows
        nrows = cutlass.min(km_rows, qe - r0)
        cc0 = tcc[b]
        nb = tcc[b + 1] - cc0
        tb = _t(tbase)[b]
        if (nrows > 0) & (nb > 0) & (tb >= 0) & (i >= 0):
            if Int64(tb) + Int64(i + 1) * Int64(nb) <= Int64(tb_bound):
                ok = Int32(1)
    return ok, b, i, r0, nrows, cc0, nb, tb


class BlockCountKernel:
    """Per-(block, chunk) selection counts -> T. Key: ("kmcount", vec, arch); ``vec``: compiled
    for ``topk % 4 == 0`` (16-byte selection loads)."""

    def __init__(self, vec: bool = False):
        self.nthr = KM_THREADS
        self.vec = vec

    @cute.jit
    def __call__(self, sel: cute.Pointer, cu_q: cute.Pointer, cu_chunks: cute.Pointer, cu_kblocks: cute.Pointer,
                 tbase: cute.Pointer, table: cute.Pointer, B: Int32, total_q: Int32, H: Int32, topk: Int32,
                 km_rows: Int32, kb_bound: Int32, tb_bound: Int32, stream: cuda.CUstream):
        self.kernel(sel, cu_q, cu_chunks, cu_kblocks, tbase, table, B, total_q, H, topk, km_rows, tb_bound).launch(
            grid=(kb_bound, H, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, sel: cute.Pointer, cu_q: cute.Pointer, cu_chunks: cute.Pointer, cu_kblocks: cute.Pointer,
               tbase: cute.Pointer, table: cute.Pointer, B: Int32, total_q: Int32, H: Int32, topk: Int32,
               km_rows: Int32, tb_bound: Int32):
        tid, _, _ = cute.arch.thread_idx()
        blk, h, _ = cute.arch.block_idx()
        NT = self.nthr
        smem = cutlass.utils.SmemAllocator()
        hist = smem.allocate_tensor(Int32, cute.make_layout(COUNT_WIN), 16)
        vals = cute.make_rmem_tensor(cute.make_layout(SEL_BATCH), Int32)
        vals2 = cute.make_rmem_tensor(cute.make_layout(SEL_BATCH), Int32)
        ok, b, i, r0, nrows, cc0, nb, tb = _block_geom(cu_q, cu_chunks, cu_kblocks, tbase, B, total_q, km_rows,
                                                      tb_bound, blk)
        if ok != 0:
            trow = _t(table + (Int64(h) * Int64(tb_bound) + Int64(tb) + Int64(i) * Int64(nb)))
            lane = tid % 32
            for w0 in cutlass.range(0, nb, COUNT_WIN):
                nw = cutlass.min(Int32(COUNT_WIN), nb - w0)
                for jj in cutlass.range(tid, nw, NT):
                    hist[jj] = Int32(0)
                cute.arch.sync_threads()
                # (vector variant) two rounds of NT rows at a time: both rounds' loads are
                # issued before the first round's atomics (one memory latency per pair of rounds)
                RND = 2 if self.vec else 1
                for base in cutlass.range(0, nrows, RND * NT):
                    rr = base + tid
                    tsel = _t(sel + (Int64(r0 + rr) * Int64(H) + Int64(h)) * Int64(topk))
                    tsel2 = _t(sel + (Int64(r0 + rr + NT) * Int64(H) + Int64(h)) * Int64(topk))
                    for s0 in cutlass.range(0, topk, SEL_BATCH):
                        # the batch's loads are issued back to back (one latency per batch)
                        _load_sel(tsel, vals, rr < nrows, s0, topk, self.vec)
                        if cutlass.const_expr(RND == 2):
                            _load_sel(tsel2, vals2, rr + NT < nrows, s0, topk, self.vec)
                        for u in cutlass.range_constexpr(RND * SEL_BATCH):
                            if s0 + (u % SEL_BATCH) < topk:
                                jw = Int32(-1)
                                j = vals[u] if u < SEL_BATCH else vals2[u - SEL_BATCH]
                                if (j >= w0) & (j < w0 + nw):
                                    jw = j - w0
                                lead, m = _run_mask(jw, lane)
                                if (jw >= 0) & (lead != 0):
                                    cute.arch.atomic_add((hist.iterator + jw).llvm_ptr, Int32(cute.arch.popc(m)))
                cute.arch.sync_threads()
                for jj in cutlass.range(tid, nw, NT):
                    trow[w0 + jj] = hist[jj]
                cute.arch.sync_threads()


class ColumnScanKernel:
    """Column-wise exclusive scan of T over blocks; segment counts. Key: ("kmcolscan", arch).

    A CTA covers 32 consecutive chunks (lanes: coalesced rows of T) of one head, and each of
    its ``COLSCAN_SEGS`` warps one contiguous range of the blocks: range sums, an exclusive scan
    of the sums over the warps in shared memory, then each warp rescans its range. The serial
    depth per thread is ``nblk / COLSCAN_SEGS`` instead of ``nblk`` (one thread per column was
    latency bound: 256 dependent loads and stores per column at 64K)."""

    def __init__(self):
        self.nthr = 32 * COLSCAN_SEGS

    @cute.jit
    def __call__(self, cu_chunks: cute.Pointer, cu_kblocks: cute.Pointer, tbase: cute.Pointer, table: cute.Pointer,
                 counts: cute.Pointer, B: Int32, H: Int32, tb_bound: Int32, chunk_bound: Int32,
                 stream: cuda.CUstream):
        self.kernel(cu_chunks, cu_kblocks, tbase, table, counts, B, H, tb_bound, chunk_bound).launch(
            grid=((chunk_bound + 31) // 32, H, 1), block=(self.nthr, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, cu_chunks: cute.Pointer, cu_kblocks: cute.Pointer, tbase: cute.Pointer, table: cute.Pointer,
               counts: cute.Pointer, B: Int32, H: Int32, tb_bound: Int32, chunk_bound: Int32):
        tid, _, _ = cute.arch.thread_idx()
        bx, h, _ = cute.arch.block_idx()
        NS = COLSCAN_SEGS
        lane = tid % 32
        w = tid // 32
        g = bx * 32 + lane
        smem = cutlass.utils.SmemAllocator()
        part = smem.allocate_tensor(Int32, cute.make_layout(NS * 32), 16)
        tcc = _t(cu_chunks)
        tkb = _t(cu_kblocks)
        ok = Int32(0)
        nb = Int32(1)
        nblk = Int32(0)
        base = Int64(0)
        if g < chunk_bound:
            nch = Int32(0)
            if B > 0:
                nch = tcc[B]
            if g < nch:
                b = find_segment(cu_chunks, B, g)
                cc0 = tcc[b]
                j = g - cc0
                nb = tcc[b + 1] - cc0
                nblk = tkb[b + 1] - tkb[b]
                tb = _t(tbase)[b]
                if (tb >= 0) & (nb > 0) & (j >= 0) & (j < nb):
                    room = (Int64(tb_bound) - Int64(tb)) // Int64(nb)
                    nblk = Int32(cutlass.max(cutlass.min(Int64(nblk), room), Int64(0)))
                    base = Int64(h) * Int64(tb_bound) + Int64(tb) + Int64(j)
                    ok = Int32(1)
        col = _t(table + base)
        seg = (nblk + NS - 1) // NS
        i0 = cutlass.min(w * seg, nblk)
        i1 = cutlass.min(i0 + seg, nblk)
        U = 8
        vals = cute.make_rmem_tensor(cute.make_layout(U), Int32)
        # ---- 1. this warp's range sum (U independent loads in flight)
        s = Int32(0)
        if ok != 0:
            for ib in cutlass.range(i0, i1, U):
                _load_column(col, vals, ib, i1, nb)
                for u in cutlass.range_constexpr(U):
                    s = s + vals[u]
        part[w * 32 + lane] = s
        cute.arch.sync_threads()
        # ---- 2. exclusive prefix over the warps' ranges, and the column total
        run = Int32(0)
        total = Int32(0)
        for v in cutlass.range_constexpr(NS):
            x = part[v * 32 + lane]
            if v < w:
                run = run + x
            total = total + x
        # ---- 3. rescan the range: each entry becomes the count of the rows before its block
        if ok != 0:
            for ib in cutlass.range(i0, i1, U):
                _load_column(col, vals, ib, i1, nb)
                for u in cutlass.range_constexpr(U):
                    if ib + u < i1:
                        col[(ib + u) * nb] = run
                        run = run + vals[u]
        if (w == 0) & (g < chunk_bound):
            _t(counts)[g * H + h] = total


class SegmentScanKernel:
    """offsets = exclusive scan(counts), offsets[nseg] = total, plus a head-major copy
    ``offs_hm[h * nbound + chunk]`` (``offsets`` is chunk-major, seg = chunk*H + h: the write
    pass of one head would read it at a stride of H). One CTA per head: each CTA reads all
    counts of its chunks (every head: the chunk totals), scans the totals over the chunks
    and adds its own head's part within the chunk. A single CTA for everything took 13 us at
    64K on an H200, bound by its one SM's scattered stores of the head-major copy; split per
    head, each SM writes one head's copy contiguously. Key: ("kmscan", arch)."""

    def __init__(self):
        self.nthr = SCAN_THREADS

    @cute.jit
    def __call__(self, counts: cute.Pointer, offsets: cute.Pointer, offs_hm: cute.Pointer, nseg: Int32, H: Int32,
                 stream: cuda.CUstream):
        self.kernel(counts, offsets, offs_hm, nseg, H).launch(grid=(H, 1, 1), block=(self.nthr, 1, 1),
                                                              stream=stream)

    @cute.kernel
    def kernel(self, counts: cute.Pointer, offsets: cute.Pointer, offs_hm: cute.Pointer, nseg: Int32, H: Int32):
        tid, _, _ = cute.arch.thread_idx()
        h, _, _ = cute.arch.block_idx()
        smem = cutlass.utils.SmemAllocator()
        s_w = smem.allocate_tensor(Int32, cute.make_layout(64), 16)
        tc = _t(counts)
        to = _t(offsets)
        thm = _t(offs_hm)
        nbound = nseg // cutlass.max(H, Int32(1))
        CPT = SCAN_CPT
        tots = cute.make_rmem_tensor(cute.make_layout(CPT), Int32)
        parts = cute.make_rmem_tensor(cute.make_layout(CPT), Int32)
        carry = Int32(0)
        for base in cutlass.range(0, nbound, self.nthr * CPT):
            g0 = base + tid * CPT
            for c in cutlass.range_constexpr(CPT):
                tots[c] = Int32(0)
                parts[c] = Int32(0)
            # 4 heads of each of the CPT chunks per step: independent loads (16-byte ones when
            # H % 4 == 0, where every chunk's row of counts is 16-byte aligned)
            for hh in cutlass.range(0, H, 4):
                for c in cutlass.range_constexpr(CPT):
                    g = g0 + c
                    xs = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                    if g < nbound:
                        if H % 4 == 0:
                            v4 = cute.make_tensor((counts + (g * H + hh)).align(16), cute.make_layout(4)).load()
                            for e in cutlass.range_constexpr(4):
                                xs[e] = v4[e]
                        else:
                            for e in cutlass.range_constexpr(4):
                                xs[e] = Int32(0)
                                if hh + e < H:
                                    xs[e] = tc[g * H + hh + e]
                    else:
                        for e in cutlass.range_constexpr(4):
                            xs[e] = Int32(0)
                    for e in cutlass.range_constexpr(4):
                        tots[c] = tots[c] + xs[e]
                        if hh + e < h:
                            parts[c] = parts[c] + xs[e]
            local = Int32(0)
            for c in cutlass.range_constexpr(CPT):
                local = local + tots[c]
            pre, tot = block_exclusive_scan(local, s_w, tid, self.nthr // 32)
            run = carry + pre
            for c in cutlass.range_constexpr(CPT):
                g = g0 + c
                if g < nbound:
                    v = run + parts[c]
                    thm[h * nbound + g] = v
                    to[g * H + h] = v
                run = run + tots[c]
            carry = carry + tot
        if (h == 0) & (tid == 0):
            to[nseg] = carry


class BlockWriteKernel:
    """Ascending query rows per segment + ``-1`` tail. Key: ("kmwrite", vec, arch); ``vec`` as
    for :class:`BlockCountKernel`.

    Per group of 256 rows and window of chunks, the entries are first placed in a shared-memory
    stage grouped by chunk (each chunk's entries contiguous and ascending, the order of the
    chunks does not matter), together with their destinations, and then written from the stage
    in order: consecutive threads store consecutive entries of a segment, so a warp's store
    touches a few runs of ``query_rows`` instead of ~32 different segments (the direct stores
    made this pass L2-bound: 74 % L2 throughput for ~13.5M store sectors at 64K). Entries past
    the stage's capacity (``topk > WRITE_STAGE / 256``) are stored directly."""

    def __init__(self, vec: bool = False):
        self.nthr = WRITE_THREADS
        self.vec = vec

    @cute.jit
    def __call__(self, sel: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer,
                 cu_kblocks: cute.Pointer, tbase: cute.Pointer, table: cute.Pointer, offsets: cute.Pointer,
                 offs_hm: cute.Pointer, query_rows: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32,
                 H: Int32, topk: Int32, chunk_size: Int32, causal: Int32, km_rows: Int32, kb_bound: Int32,
                 tb_bound: Int32, nseg: Int32, cap: Int32, stream: cuda.CUstream):
        self.kernel(sel, cu_q, cu_k, cu_chunks, cu_kblocks, tbase, table, offsets, offs_hm, query_rows, B, total_q,
                    total_k, H, topk, chunk_size, causal, km_rows, kb_bound, tb_bound, nseg, cap).launch(
            grid=(kb_bound, H, 1), block=(self.nthr, 1, 1), stream=stream,
            # an explicit occupancy target (4 CTAs: <= 64 registers, 4 x ~53 KB of shared
            # memory): left alone, ptxas may squeeze registers for a 5th CTA and spill
            min_blocks_per_mp=WRITE_MIN_CTAS, preferred_smem_carveout=100)

    @cute.kernel
    def kernel(self, sel: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer,
               cu_kblocks: cute.Pointer, tbase: cute.Pointer, table: cute.Pointer, offsets: cute.Pointer,
               offs_hm: cute.Pointer, query_rows: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32,
               H: Int32, topk: Int32, chunk_size: Int32, causal: Int32, km_rows: Int32, kb_bound: Int32,
               tb_bound: Int32, nseg: Int32, cap: Int32):
        tid, _, _ = cute.arch.thread_idx()
        blk, h, _ = cute.arch.block_idx()
        NT = self.nthr
        NW = NT // 32
        WIN = WRITE_WIN
        CPT = WIN // NT  # chunks per thread in the per-group scan (strided: jj = tid + c * NT)
        SCAP = WRITE_STAGE
        wid = tid // 32
        smem = cutlass.utils.SmemAllocator()
        # warp-major [warp][chunk]: the scan's strided chunk walk is bank-conflict free
        bits = smem.allocate_tensor(Int32, cute.make_layout(WIN * NW), 16)
        lpre = smem.allocate_tensor(LPRE_T, cute.make_layout(WIN * NW), 16)
        run = smem.allocate_tensor(Int32, cute.make_layout(WIN), 16)
        delta = smem.allocate_tensor(Int32, cute.make_layout(WIN), 16)
        srow = smem.allocate_tensor(Int32, cute.make_layout(SCAP), 16)
        sdst = smem.allocate_tensor(Int32, cute.make_layout(SCAP), 16)
        s_w = smem.allocate_tensor(Int32, cute.make_layout(NW + 8), 16)
        vals = cute.make_rmem_tensor(cute.make_layout(SEL_BATCH), Int32)
        tqr = _t(query_rows)
        # ---- -1 past the last used entry: an even slice of [offsets[-1], cap) per CTA
        total = _t(offsets)[nseg]
        start = cutlass.min(cutlass.max(total, Int32(0)), cap)
        # (int32: the host ensures cap + 2 * kb_bound * H < 2^31)
        nctas = kb_bound * H
        sl = (cap - start + nctas - 1) // nctas
        lo = cutlass.min(start + (h * kb_bound + blk) * sl, cap)
        hi = cutlass.min(lo + sl, cap)
        for e in cutlass.range(lo + tid, hi, NT):
            tqr[e] = Int32(-1)
        ok, b, i, r0, nrows, cc0, nb, tb = _block_geom(cu_q, cu_chunks, cu_kblocks, tbase, B, total_q, km_rows,
                                                      tb_bound, blk)
        if ok != 0:
            lim = nb
            if causal != 0:
                qs, qe = clamp_seq(cu_q, b, total_q)
                ks, ke = clamp_seq(cu_k, b, total_k)
                p_last = (r0 + nrows - 1 - qs) + (ke - ks) - (qe - qs)
                lim = Int32(0)
                if p_last >= 0:
                    lim = cutlass.min(nb, p_last // chunk_size + 1)
            trow = _t(table + (Int64(h) * Int64(tb_bound) + Int64(tb) + Int64(i) * Int64(nb)))
            # this head's segment offsets, contiguous over chunks (head-major copy)
            to = _t(offs_hm + Int64(h) * Int64(nseg // H))
            lane = tid % 32
            for w0 in cutlass.range(0, lim, WIN):
                nw = cutlass.min(Int32(WIN), lim - w0)
                for jj in cutlass.range(tid, nw, NT):
                    run[jj] = to[cc0 + w0 + jj] + trow[w0 + jj]
                for base in cutlass.range(0, nrows, NT):
                    for c in cutlass.range_constexpr(CPT):
                        jj = tid + c * NT
                        if jj < nw:
                            for w in cutlass.range_constexpr(NW):
                                bits[w * WIN + jj] = Int32(0)
                    cute.arch.sync_threads()
                    rr = base + tid
                    row = r0 + rr
                    tsel = _t(sel + (Int64(row) * Int64(H) + Int64(h)) * Int64(topk))
                    for s0 in cutlass.range(0, topk, SEL_BATCH):
                        _load_sel(tsel, vals, rr < nrows, s0, topk, self.vec)
                        for u in cutlass.range_constexpr(SEL_BATCH):
                            if s0 + u < topk:
                                jw = Int32(-1)
                                j = vals[u]
                                if (j >= w0) & (j < w0 + nw):
                                    jw = j - w0
                                lead, m = _run_mask(jw, lane)
                                if (jw >= 0) & (lead != 0):
                                    cute.arch.atomic_or((bits.iterator + (wid * WIN + jw)).llvm_ptr, m)
                    cute.arch.sync_threads()
                    # ---- stage layout: the group's entries of each chunk contiguous; this
                    # thread's chunks follow each other, the threads' blocks in thread order
                    mine = Int32(0)
                    for c in cutlass.range_constexpr(CPT):
                        jj = tid + c * NT
                        if jj < nw:
                            for w in cutlass.range_constexpr(NW):
                                mine = mine + Int32(cute.arch.popc(bits[w * WIN + jj]))
                    p, n_stage = block_exclusive_scan(mine, s_w, tid, NW)
                    for c in cutlass.range_constexpr(CPT):
                        jj = tid + c * NT
                        if jj < nw:
                            g0 = run[jj]
                            delta[jj] = g0 - p
                            p0 = p
                            for w in cutlass.range_constexpr(NW):
                                lpre[w * WIN + jj] = LPRE_T(p)
                                p = p + Int32(cute.arch.popc(bits[w * WIN + jj]))
                            run[jj] = g0 + (p - p0)
                    cute.arch.sync_threads()
                    if rr < nrows:
                        # topk <= SEL_BATCH (the common case): the row's selection is still in
                        # registers from the bitmap pass; longer rows reload batch by batch
                        for s0 in cutlass.range(0, topk, SEL_BATCH):
                            if topk > SEL_BATCH:
                                _load_sel(tsel, vals, rr < nrows, s0, topk, self.vec)
                            for u in cutlass.range_constexpr(SEL_BATCH):
                                if s0 + u < topk:
                                    j = vals[u]
                                    if (j >= w0) & (j < w0 + nw):
                                        e = wid * WIN + (j - w0)
                                        below = bits[e] & Int32(cute.arch.lanemask_lt())
                                        x = Int32(lpre[e]) + Int32(cute.arch.popc(below))
                                        pos = x + delta[j - w0]
                                        if x < SCAP:
                                            srow[x] = row
                                            sdst[x] = pos
                                        elif (pos >= 0) & (pos < cap):
                                            tqr[pos] = row
                    cute.arch.sync_threads()
                    # ---- stage -> query_rows: consecutive threads, consecutive entries
                    for x in cutlass.range(tid, cutlass.min(n_stage, Int32(SCAP)), NT):
                        pos = sdst[x]
                        if (pos >= 0) & (pos < cap):
                            tqr[pos] = srow[x]
