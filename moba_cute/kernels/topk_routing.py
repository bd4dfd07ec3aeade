"""Tiled centroid top-k routing kernel (CuTe DSL: warpgroup MMA on sm90, mma.sync on sm80).

One CTA of ``BM`` threads handles ``BM`` packed query rows of one sequence and one KV head
(``BM/32`` warps): packed row ``m`` is (position ``m // G``, query head ``hk * G + m % G``), so
a centroid tile in shared memory is reused by all ``G`` query heads of the KV group. The CTA
walks the tiles of ``BN`` centroids of its sequence in ascending chunk order and scores them
on the tensor cores with a hi/lo split of the fp32 centroid (``q*c_hi + q*c_lo``, fp32
accumulation, so scores carry ~fp32 precision), ``mma_n`` (32 or 16) columns per MMA pass. For
head dims up to 128 the query fragments are loaded into registers once.

Two MMA flavours (``wgmma`` in the compile key, chosen in ``configs/routing.py``):

* sm90, D = 64 / 128: the CTA is one warpgroup; RS ``wgmma.m64n32k16`` (two per k-step for
  the 128 rows) with the query fragments in registers and the centroid tile in 128-byte
  swizzled K-major slabs (one per stage, hi/lo and pass), written by cp.async and fenced for
  the async proxy before the MMA;
* otherwise mma.sync m16n8k16 with ldmatrix from padded shared-memory rows.

Per tile: barrier, MMA into the score tile (shared memory, one pass at a time; passes past the
CTA's last chunk are skipped), barrier, selection. With two centroid buffers (two-stage tile)
tile t+1 is fetched during tile t's MMA and selection; with one (the sm90 tile, 4 CTAs per SM)
it is fetched once the MMA is done, during the selection.
The threads select one row each:

* the row's ``BN`` scores are compared with its running threshold (its current L-th best)
  into a bit mask (two 32-bit words for ``BN = 64``);
* on the first tile the threshold is ``-inf``, so a lower bound of the tile's L-th best is
  used instead: the minimum over ``L`` disjoint column groups of the group maxima (``L``
  scores are >= it), which cuts the first tile's candidates from ``BN`` to ~``2L``;
* only the set bits go through the insertion network, lowest column first, so a warp runs
  the network as often as its busiest row inserts. The loop is branch free (a
  candidate below the threshold leaves a descending list unchanged) and loads the next
  candidate's score before inserting the current one.

The score matrix never leaves the SM, and the thread writes its row of the selection in the
order of :mod:`moba_cute.routing` (causal: own chunk in slot 0, then descending score; ties go
to the larger chunk index; ``-1`` padding).

NaN scores (NaN in q or in a chunk's keys) are stored as +inf in the score tile, so they rank
first, as in the reference (``moba_cute/reference.py``) and as NaN would reach those rows in
dense attention; every selected id still comes from a column below the row's limit.

Ties: candidates arrive in ascending chunk order, so ``v >= threshold`` (and ``>=`` in the
network) lets the later (larger-index) chunk win; skipping candidates below a lower bound of
the final L-th best cannot change the result (the result is the top-L by (score, index)).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, Int64, Float32, Uint32
from cutlass.cute.nvgpu import cpasync, warp, warpgroup
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.utils import LayoutEnum

from .centroids import clamp_seq, find_segment



@cute.jit
def low_bits(n: Int32):
    """Mask of the lowest ``clamp(n, 0, 32)`` bits."""
    r = cutlass.min(cutlass.max(n, Int32(0)), Int32(32))
    m = Uint32(0xFFFFFFFF)
    if r < 32:
        m = (Uint32(1) << Uint32(r)) - Uint32(1)
    return m


@cute.jit
def pop_lowest(w0: Uint32, w1: Uint32):
    """Pops the lowest set bit of the 64-bit mask ``w0 | w1 << 32``: (bit index, w0, w1); the
    index is 64 when the mask is empty."""
    use1 = w0 == Uint32(0)
    w = Uint32(cutlass.select_(use1, w1, w0))
    low = w & (~w + Uint32(1))
    c = Int32(cute.arch.popc(low - Uint32(1))) + cutlass.select_(use1, Int32(32), Int32(0))
    w2 = w ^ low
    return c, Uint32(cutlass.select_(use1, w0, w2)), Uint32(cutlass.select_(use1, w2, w1))


class TopkRoutingKernel:
    """Compile key: ("topk", dtype, head_dim, list_cap, causal, BM, BN, stages, mma_n, ctas_per_sm,
    wgmma, arch)."""

    def __init__(self, dtype, head_dim: int, list_cap: int, causal: bool, bm: int = 128, bn: int = 32,
                 stages: int = 2, mma_n: int = 32, ctas_per_sm: int = 0, wgmma: bool = False):
        assert head_dim % 16 == 0 or head_dim in (96,)
        assert bm in (64, 128) and bn in (16, 32, 64)
        self.dtype = dtype
        self.D = head_dim
        # static capacity of a running list: exactly the runtime list length for register lists
        # (<= 16), >= it for shared-memory lists
        self.L = list_cap
        self.causal = causal
        self.BM = bm
        self.BN = bn
        assert mma_n in (16, 32)
        self.MN = min(bn, mma_n)  # columns per MMA pass
        assert stages in (1, 2)
        self.stages = stages  # centroid tile buffers: 2 = tile t+1 loads during tile t's MMA too
        self.nthr = bm  # one thread per row in the selection
        self.nwarps = bm // 32
        self.DP = head_dim + 8  # padded smem row (16 B pad: conflict-free ldmatrix)
        self.SP = bm + 4  # score tile column stride (= 4 mod 32: conflict-free writes and reads)
        self.hoist = head_dim <= 128  # query fragments live in registers
        self.reg_lists = list_cap <= 16
        # the score tile reuses the query tile's shared memory once the fragments are loaded
        self.alias_scores = self.hoist and bn * self.SP * 4 <= bm * self.DP * 2
        # first-tile lower bound: L groups of >= 2 columns
        self.first_bound = self.reg_lists and 2 * list_cap <= bn
        # occupancy target (configs/routing.py: the sm90 tile asks for 4 CTAs per SM, i.e.
        # <= 128 registers); 0: what ptxas chooses
        self.min_ctas = ctas_per_sm
        # sm90 warpgroup MMA (one warpgroup = the CTA's 128 threads, query fragments in
        # registers, centroid tiles in 128B-swizzled K-major slabs of MN rows) instead of
        # mma.sync
        self.wg = wgmma
        assert not wgmma or (bm == 128 and self.hoist and bn % self.MN == 0)
        self.nslab = stages * 2 * (bn // self.MN)  # [stage][hi | lo][pass]
        # centroid tile loads with loop-invariant addressing: a thread's 16-byte pieces are
        # NT / CV rows apart in the same column
        cv = head_dim // 8
        self.fast_ctile = self.nthr % cv == 0 and (bn * cv) % self.nthr == 0
        assert not wgmma or (self.fast_ctile and self.nthr // cv <= self.MN and head_dim % 64 == 0)

    @cute.jit
    def __call__(
        self,
        q: cute.Pointer,
        c_hi: cute.Pointer,
        c_lo: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cu_mtiles: cute.Pointer,
        sel: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        topk: Int32,
        chunk_bound: Int32,
        mtile_bound: Int32,
        rows_per_tile: Int32,
        stream: cuda.CUstream,
    ):
        if cutlass.const_expr(self.wg):
            tiled_mma = sm90_utils.make_trivial_tiled_mma(
                self.dtype, self.dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
                Float32, (1, 1, 1), (64, self.MN), a_source=warpgroup.OperandSource.RMEM,
            )
        else:
            tiled_mma = cute.make_tiled_mma(
                warp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)),
                (self.nwarps, 1, 1),
                permutation_mnk=(self.nwarps * 16, 16, 16),
            )
        self.kernel(
            q, c_hi, c_lo, cu_q, cu_k, cu_chunks, cu_mtiles, sel, B, total_q, total_k, H, Hk,
            chunk_size, topk, chunk_bound, mtile_bound, rows_per_tile, tiled_mma,
        ).launch(grid=(mtile_bound * Hk, 1, 1), block=(self.nthr, 1, 1), stream=stream,
                 min_blocks_per_mp=self.min_ctas,
                 preferred_smem_carveout=100 if self.min_ctas else None)

    @cute.kernel
    def kernel(
        self,
        q: cute.Pointer,
        c_hi: cute.Pointer,
        c_lo: cute.Pointer,
        cu_q: cute.Pointer,
        cu_k: cute.Pointer,
        cu_chunks: cute.Pointer,
        cu_mtiles: cute.Pointer,
        sel: cute.Pointer,
        B: Int32,
        total_q: Int32,
        total_k: Int32,
        H: Int32,
        Hk: Int32,
        chunk_size: Int32,
        topk: Int32,
        chunk_bound: Int32,
        mtile_bound: Int32,
        rows_per_tile: Int32,
        tiled_mma: cute.TiledMma,
    ):
        tid, _, _ = cute.arch.thread_idx()
        bflat, _, _ = cute.arch.block_idx()
        # KV head fastest: the Hk CTAs of one query tile run together (the query rows' heads
        # are adjacent in memory), tiles heavy (late) to light over all heads
        bid = bflat // Hk
        hk = bflat - bid * Hk
        BM = self.BM
        BN = self.BN
        MN = self.MN
        D = self.D
        DP = self.DP
        SP = self.SP
        NT = self.nthr
        LC = self.L
        CV = D // 8
        dt = self.dtype

        smem = cutlass.utils.SmemAllocator()
        q_layout = cute.make_layout((BM, D), stride=(DP, 1))
        c_layout = cute.make_layout((MN, D), stride=(DP, 1))
        ST = self.stages
        if cutlass.const_expr(self.wg):
            # wgmma B operand: canonical K-major swizzled slabs (MN, D), one per (stage, hi/lo, pass)
            c_atom = warpgroup.make_smem_layout_atom(
                sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dt, D), dt)
            c_slabs = cute.tile_to_shape(c_atom, (MN, D, self.nslab), order=(0, 1, 2))
            sC = smem.allocate_tensor(dt, c_slabs.outer, 1024, swizzle=c_slabs.inner)
            c_outer = c_slabs.outer
        else:
            c_outer = None
            sC = smem.allocate_tensor(dt, cute.make_layout(ST * 2 * BN * DP), 128)  # [stage][hi | lo]
        sQ = smem.allocate_tensor(dt, q_layout, 128)
        if cutlass.const_expr(self.alias_scores):
            sS = cute.make_tensor(cute.recast_ptr(sQ.iterator, dtype=Float32), cute.make_layout(BN * SP))
        else:
            sS = smem.allocate_tensor(Float32, cute.make_layout(BN * SP), 16)
        sLv = sS
        sLi = sS
        if cutlass.const_expr(not self.reg_lists):
            sLv = smem.allocate_tensor(Float32, cute.make_layout(LC * NT), 16)
            sLi = smem.allocate_tensor(Int32, cute.make_layout(LC * NT), 16)

        G = H // Hk
        tmt = cute.make_tensor(cu_mtiles, cute.make_layout(1 << 30))
        tcc = cute.make_tensor(cu_chunks, cute.make_layout(1 << 30))
        tix = mtile_bound - 1 - bid  # heavy (late) tiles first
        ntot = Int32(0)
        if B > 0:
            ntot = tmt[B]
        if tix < ntot:
            b = find_segment(cu_mtiles, B, tix)
            m0 = (tix - tmt[b]) * rows_per_tile
            qs, qe = clamp_seq(cu_q, b, total_q)
            ks, ke = clamp_seq(cu_k, b, total_k)
            sq = qe - qs
            sk = ke - ks
            cc0 = tcc[b]
            nb = tcc[b + 1] - cc0
            nrows_seq = sq * G
            m_end = cutlass.min(m0 + rows_per_tile, nrows_seq)
            shift = sk - sq
            L = topk
            if cutlass.const_expr(self.causal):
                L = topk - 1

            # ---- tile extent over chunks
            lim_max = nb
            if cutlass.const_expr(self.causal):
                p_last = (m_end - 1) // G + shift
                lim_max = Int32(0)
                if p_last >= 0:
                    lim_max = cutlass.min(p_last // chunk_size, nb)
            ntiles = (lim_max + BN - 1) // BN
            if L <= 0:
                ntiles = Int32(0)

            atom_g2s = cute.make_copy_atom(
                cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt,
                num_bits_per_copy=128,
            )
            # the sequence's first centroid of this KV head
            # (centroid element offsets fit in int32: route_launch checks num_chunks_bound*Hk*D)
            hk_base = (hk * chunk_bound + cc0) * D
            c_g0, c_n0, c_s0 = self.ctile_plan(sC, c_outer, hk_base, tid)
            if ntiles > 0:
                # ---- Q tile -> smem (rows past the tile are clamped to a valid row; never stored)
                row_stride_q = Int64(H) * Int64(D)
                # packed row m0 + r = (position, head): one division per CTA, then per row either
                # a float-reciprocal quotient of (m0 % G + r) / G (< G + BM: exact with the +0.5)
                # or, where a thread's pieces are rows r0, r0 + RQ, ... of one column, a running
                # (position, head) and source offset
                pos_b = m0 // G
                hg_b = m0 - pos_b * G
                inv_g = cute.arch.rcp_approx(Float32(G))
                if cutlass.const_expr(NT % CV == 0):
                    RQ = NT // CV
                    r0 = tid // CV
                    cv = tid - r0 * CV
                    u0 = hg_b + r0
                    q0 = Int32((Float32(u0) + Float32(0.5)) * inv_g)
                    hg = u0 - q0 * G
                    col = Int64((hk * G) * D + cv * 8)
                    off = (Int64(qs) + Int64(pos_b + q0)) * row_stride_q + Int64(hg * D) + col
                    # rows past the tile copy row 0 (never stored)
                    off_row0 = (Int64(qs) + Int64(pos_b)) * row_stride_q + Int64(hg_b * D) + col
                    sp = Int32((Float32(RQ) + Float32(0.5)) * inv_g)  # RQ = sp * G + sh
                    sh = RQ - sp * G
                    step = Int64(sp) * row_stride_q + Int64(sh * D)
                    wrap_step = row_stride_q - Int64(G * D)
                    for k in cutlass.range(BM * CV // NT, unroll=4):
                        r = r0 + k * RQ
                        o = off
                        if m0 + r >= m_end:
                            o = off_row0
                        src = cute.make_tensor(q + cute.assume(o, divby=8), cute.make_layout(8))
                        dst = cute.make_tensor(sQ.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8))
                        cute.copy(atom_g2s, src, dst)
                        hg = hg + sh
                        wrap = hg >= G
                        hg = cutlass.select_(wrap, hg - G, hg)
                        off = off + step + cutlass.select_(wrap, wrap_step, Int64(0))
                else:
                    for idx in cutlass.range(tid, BM * CV, NT):
                        r = idx // CV
                        cv = idx - r * CV
                        rr = r
                        if m0 + r >= m_end:
                            rr = Int32(0)
                        u = hg_b + rr
                        qg = Int32((Float32(u) + Float32(0.5)) * inv_g)
                        hg = u - qg * G
                        off = (Int64(qs) + Int64(pos_b + qg)) * row_stride_q + Int64((hk * G + hg) * D + cv * 8)
                        src = cute.make_tensor(q + cute.assume(off, divby=8), cute.make_layout(8))
                        dst = cute.make_tensor(sQ.iterator + cute.assume(r * DP + cv * 8, divby=8), cute.make_layout(8))
                        cute.copy(atom_g2s, src, dst)
                self.load_ctile(atom_g2s, c_hi, c_lo, c_g0, c_n0, c_s0, sC, c_outer, Int32(0), Int32(0), nb)
                cute.arch.cp_async_commit_group()

            # ---- running list (registers when the capacity is small, else shared memory)
            rlv = cute.make_rmem_tensor(cute.make_layout(LC), Float32)
            rli = cute.make_rmem_tensor(cute.make_layout(LC), Int32)
            if cutlass.const_expr(self.reg_lists):
                for s in cutlass.range_constexpr(LC):
                    rlv[s] = -Float32.inf
                    rli[s] = Int32(-1)
            else:
                for s in cutlass.range(L):
                    sLv[s * NT + tid] = -Float32.inf
                    sLi[s * NT + tid] = Int32(-1)
            thr = -Float32.inf
            nfill = Int32(0)  # filled entries of a shared-memory list (capped at L - 1)
            Lm1 = L - 1
            my_m = m0 + tid
            my_lim = Int32(0)
            if my_m < m_end:
                my_lim = nb
                if cutlass.const_expr(self.causal):
                    p = my_m // G + shift
                    my_lim = Int32(0)
                    if p >= 0:
                        my_lim = cutlass.min(p // chunk_size, nb)

            # ---- MMA partitions (one MN-column pass at a time)
            thr_mma = tiled_mma.get_slice(tid)
            ld_atom = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
            s2r_A = cute.make_tiled_copy_A(ld_atom, tiled_mma)
            thr_A = s2r_A.get_slice(tid)
            tSsQ = thr_A.partition_S(sQ)
            if cutlass.const_expr(self.wg):
                # query fragments (registers, RS wgmma); descriptors of every centroid slab
                tSrQ = thr_mma.make_fragment_A(thr_mma.partition_shape_A((BM, D)))
                tSrC = thr_mma.make_fragment_B(thr_mma.partition_B(sC))
            else:
                # query and centroid fragments, the centroids' (hi, lo) through ldmatrix per pass
                tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
                sC0 = cute.make_tensor(sC.iterator, c_layout)
                tSrC = thr_mma.make_fragment_B(thr_mma.partition_B(sC0))
                tSrC2 = thr_mma.make_fragment_B(thr_mma.partition_B(sC0))
                s2r_B = cute.make_tiled_copy_B(ld_atom, tiled_mma)
                thr_B = s2r_B.get_slice(tid)
                tSrC_v = thr_B.retile(tSrC)
                tSrC2_v = thr_B.retile(tSrC2)
            tSrQ_v = thr_A.retile(tSrQ)
            acc_shape = thr_mma.partition_shape_C((BM, MN))
            acc = cute.make_rmem_tensor(acc_shape, Float32)
            cS = cute.make_identity_tensor((BM, MN))
            tScS = thr_mma.partition_C(cS)
            NKB = cute.size(tSrQ.shape[2])

            if cutlass.const_expr(self.hoist):
                if ntiles > 0:
                    cute.arch.cp_async_wait_group(0)
                    cute.arch.sync_threads()
                    for kb in cutlass.range_constexpr(NKB):
                        cute.copy(s2r_A, tSsQ[None, None, kb], tSrQ_v[None, None, kb])

            for t in cutlass.range(ntiles):
                # centroid tile t landed; every thread is done with the previous score tile
                # (and, for t == 0, with the query tile the score tile may alias)
                cbuf = Int32(0)
                if cutlass.const_expr(ST == 2):
                    # two buffers: tile t+1 flies during this tile's MMA and selection
                    cbuf = t % 2
                    if t + 1 < ntiles:
                        self.load_ctile(atom_g2s, c_hi, c_lo, c_g0, c_n0, c_s0, sC, c_outer, (t + 1) * BN, 1 - cbuf, nb)
                    cute.arch.cp_async_commit_group()
                    cute.arch.cp_async_wait_group(1)
                else:
                    cute.arch.cp_async_wait_group(0)
                if cutlass.const_expr(self.wg):
                    # the centroid tile was written through the generic proxy; wgmma reads it
                    # through the async proxy
                    cute.arch.fence_view_async_shared()
                cute.arch.sync_threads()
                for h in cutlass.range_constexpr(BN // MN):
                    # MMA passes past the tile's last chunk are skipped (their stale scores
                    # are masked out by every row's limit)
                    if h == 0 or t * BN + h * MN < lim_max:
                        if cutlass.const_expr(self.wg):
                            NP = BN // MN
                            slab = cbuf * (2 * NP) + h
                            warpgroup.fence()
                            atom = cute.make_mma_atom(tiled_mma.op)
                            atom.set(warpgroup.Field.ACCUMULATE, False)
                            for kb in cutlass.range_constexpr(NKB):
                                cute.gemm(atom, acc, tSrQ[None, None, kb], tSrC[None, None, kb, slab], acc)
                                atom.set(warpgroup.Field.ACCUMULATE, True)
                                cute.gemm(atom, acc, tSrQ[None, None, kb], tSrC[None, None, kb, slab + NP], acc)
                            warpgroup.commit_group()
                            warpgroup.wait_group(0)
                        else:
                            cb = cbuf * (2 * BN * DP) + h * MN * DP
                            sHi = cute.make_tensor(sC.iterator + cute.assume(cb, divby=8), c_layout)
                            sLo = cute.make_tensor(sC.iterator + cute.assume(cb + BN * DP, divby=8), c_layout)
                            tSsHi = thr_B.partition_S(sHi)
                            tSsLo = thr_B.partition_S(sLo)
                            acc.fill(0.0)
                            for kb in cutlass.range_constexpr(NKB):
                                if cutlass.const_expr(not self.hoist):
                                    cute.copy(s2r_A, tSsQ[None, None, kb], tSrQ_v[None, None, kb])
                                cute.copy(s2r_B, tSsHi[None, None, kb], tSrC_v[None, None, kb])
                                cute.copy(s2r_B, tSsLo[None, None, kb], tSrC2_v[None, None, kb])
                                cute.gemm(tiled_mma, acc, tSrQ[None, None, kb], tSrC[None, None, kb], acc)
                                cute.gemm(tiled_mma, acc, tSrQ[None, None, kb], tSrC2[None, None, kb], acc)
                        for i in cutlass.range_constexpr(cute.size(acc)):
                            rc = tScS[i]
                            # a NaN score counts as +inf (ranks first, as in the reference)
                            sc = acc[i]
                            sS[(rc[1] + h * MN) * SP + rc[0]] = cutlass.select_(sc != sc, Float32.inf, sc)
                cute.arch.sync_threads()
                if cutlass.const_expr(ST == 1):
                    # the centroid buffer is free: fetch tile t+1 while this one is selected
                    if t + 1 < ntiles:
                        self.load_ctile(atom_g2s, c_hi, c_lo, c_g0, c_n0, c_s0, sC, c_outer, (t + 1) * BN, Int32(0), nb)
                    cute.arch.cp_async_commit_group()

                j0 = t * BN
                rel = my_lim - j0  # valid columns of this row in the tile
                cut = thr
                if cutlass.const_expr(self.first_bound):
                    if t == 0:
                        if rel >= BN:
                            # L scores are >= min over L disjoint groups of the group maxima
                            gmax = [-Float32.inf for _ in range(LC)]
                            for cc in cutlass.range_constexpr(BN):
                                g = cc * LC // BN
                                gmax[g] = cute.arch.fmax(gmax[g], sS[cc * SP + tid])
                            lb = gmax[0]
                            for g in cutlass.range_constexpr(1, LC):
                                lb = cutlass.min(lb, gmax[g])
                            cut = lb
                # ---- my row: which of the BN columns reach the cut (bits of w0 | w1 << 32)
                w0 = Uint32(0)
                w1 = Uint32(0)
                for cc in cutlass.range_constexpr(BN):
                    bit = Uint32(cutlass.select_(sS[cc * SP + tid] >= cut, Uint32(1 << (cc % 32)), Uint32(0)))
                    if cutlass.const_expr(cc < 32):
                        w0 = w0 | bit
                    else:
                        w1 = w1 | bit
                if rel < BN:
                    w0 = w0 & low_bits(rel)
                    w1 = w1 & low_bits(rel - 32)
                if cutlass.const_expr(self.reg_lists):
                    self.insert_reg(w0, w1, sS, tid, j0, rlv, rli)
                    thr = rlv[LC - 1]
                else:
                    thr, nfill = self.insert_smem(w0, w1, sS, tid, j0, sLv, sLi, Lm1, thr, nfill)

            cute.arch.cp_async_wait_group(0)

            # ---- write my selection row
            if my_m < m_end:
                pos = my_m // G
                hg = my_m % G
                orow = (Int64(qs) + Int64(pos)) * Int64(H) + Int64(hk * G + hg)
                out = cute.make_tensor(sel + orow * Int64(topk), cute.make_layout(1 << 30))
                slot0 = Int32(0)
                empty = Int32(0)
                if cutlass.const_expr(self.causal):
                    p = pos + shift
                    if p < 0:
                        empty = Int32(1)
                        for s in cutlass.range(topk):
                            out[s] = Int32(-1)
                    else:
                        out[0] = cutlass.min(p // chunk_size, cutlass.max(nb - 1, Int32(0)))
                        slot0 = Int32(1)
                if empty == 0:
                    if cutlass.const_expr(self.reg_lists):
                        for s in cutlass.range_constexpr(LC):
                            if s < L:
                                out[slot0 + s] = rli[s]
                    else:
                        for s in cutlass.range(L):
                            out[slot0 + s] = sLi[s * NT + tid]

    @cute.jit
    def insert_reg(self, w0: Uint32, w1: Uint32, sS: cute.Tensor, tid: Int32, j0: Int32,
                   rlv: cute.Tensor, rli: cute.Tensor):
        """Inserts the masked columns, ascending, into the register list (exact length LC)."""
        SP = self.SP
        BN = self.BN
        have = (w0 | w1) != Uint32(0)
        c, w0, w1 = self.pop(w0, w1)
        x = sS[cutlass.min(c, Int32(BN - 1)) * SP + tid]
        # (loading two candidates ahead costs the 3 registers the 4-CTA tile does not have)
        while have:
            # the next candidate's score is loaded before this one is inserted
            have_n = (w0 | w1) != Uint32(0)
            cn, w0, w1 = self.pop(w0, w1)
            xn = sS[cutlass.min(cn, Int32(BN - 1)) * SP + tid]
            self.insert_one(x, j0 + c, rlv, rli)
            x = xn
            c = cn
            have = have_n

    @cute.jit
    def pop(self, w0: Uint32, w1: Uint32):
        """Lowest set bit of the candidate mask: (column, w0, w1) as :func:`pop_lowest`; tiles of
        up to 32 columns use one word (w & -w, index popc(low - 1))."""
        if cutlass.const_expr(self.BN <= 32):
            low = w0 & (~w0 + Uint32(1))
            return Int32(cute.arch.popc(low - Uint32(1))), w0 ^ low, w1
        return pop_lowest(w0, w1)

    @cute.jit
    def insert_one(self, x: Float32, xi: Int32, rlv: cute.Tensor, rli: cute.Tensor):
        """Parallel insertion of (x, xi) into the descending list: all compares are independent
        (x >= v[s] is monotone in s), each slot takes x, its upper neighbour or itself; a
        candidate below the last entry leaves the list unchanged (no branch needed); ties: x
        goes above equal entries. Slots are updated bottom-up so each reads its upper
        neighbour's old value in place."""
        LC = self.L
        ge = [x >= rlv[s] for s in range(LC)]
        for k in cutlass.range_constexpr(LC):
            s = LC - 1 - k
            if cutlass.const_expr(s == 0):
                rlv[0] = cutlass.select_(ge[0], x, rlv[0])
                rli[0] = cutlass.select_(ge[0], xi, rli[0])
            else:
                rlv[s] = cutlass.select_(ge[s], cutlass.select_(ge[s - 1], rlv[s - 1], x), rlv[s])
                rli[s] = cutlass.select_(ge[s], cutlass.select_(ge[s - 1], rli[s - 1], xi), rli[s])

    @cute.jit
    def insert_smem(self, w0: Uint32, w1: Uint32, sS: cute.Tensor, tid: Int32, j0: Int32,
                    sLv: cute.Tensor, sLi: cute.Tensor, Lm1: Int32, thr: Float32, nfill: Int32):
        """Inserts the masked columns, ascending, into the shared-memory list; returns the new
        threshold and fill count. A candidate enters at the first free slot (the last one once
        the list is full, dropping its entry) and moves up past the entries it is >= to (ties:
        above equal entries), so it costs as many steps as entries it passes, not the list's
        length (random scores pass few once the list is full)."""
        SP = self.SP
        NT = self.nthr
        while (w0 | w1) != Uint32(0):
            c, w0, w1 = pop_lowest(w0, w1)
            x = sS[c * SP + tid]
            if x >= thr:
                xi = j0 + c
                pos = nfill
                go = pos > 0
                while go:
                    pv = sLv[(pos - 1) * NT + tid]
                    if x >= pv:
                        sLv[pos * NT + tid] = pv
                        sLi[pos * NT + tid] = sLi[(pos - 1) * NT + tid]
                        pos = pos - 1
                        go = pos > 0
                    else:
                        go = cutlass.Boolean(False)
                sLv[pos * NT + tid] = x
                sLi[pos * NT + tid] = xi
                nfill = cutlass.min(nfill + 1, Lm1)
                thr = sLv[Lm1 * NT + tid]
        return thr, nfill

    def ctile_plan(self, sC: cute.Tensor, c_outer, hk_base: Int32, tid: Int32):
        """Loop-invariant part of the centroid tile loads: this thread copies the 16-byte
        pieces (n0 + k * NT / CV, cv) of every tile (k static), so its centroid element offset
        and the shared-memory offset of its first piece are computed once (three registers).
        Returns (element offset of the thread's column, first row n0, first piece's smem offset);
        head dims without that regularity get (the centroid offset, the thread index, 0)."""
        CV = self.D // 8
        if not self.fast_ctile:
            return hk_base, tid, Int32(0)
        n0 = tid // CV
        cv = tid - n0 * CV
        if self.wg:
            # 128-byte swizzle (D = 64 or 128) applied once here: the per-tile offsets (whole
            # 8-row groups, slabs, buffers) are multiples of its 1024-byte period
            sb = cute.crd2idx((n0, cv * 8, 0), c_outer) * 2
            s0 = (sb ^ ((sb & 0x380) >> 3)) // 2
        else:
            s0 = n0 * self.DP + cv * 8
        return hk_base + cv * 8, n0, s0

    def load_ctile(self, atom, c_hi: cute.Pointer, c_lo: cute.Pointer, g0: Int32, n0: Int32,
                   s0: Int32, sC: cute.Tensor, c_outer, j0: Int32, buf: Int32, nb: Int32):
        """cp.async of centroid rows [j0, j0 + BN), hi and lo (rows past the sequence's last
        chunk repeat it and are masked out by the selection), into buffer ``buf``: padded rows
        (mma.sync) or the swizzled wgmma slabs (row n goes to pass slab n // MN, row n % MN)."""
        BN = self.BN
        MN = self.MN
        NP = BN // MN
        D = self.D
        CV = D // 8
        NT = self.nthr
        if not self.fast_ctile:
            # (head dims whose 16-byte pieces per row do not divide the CTA: per piece; n0 is
            # the thread's first piece)
            for k in range((BN * CV + NT - 1) // NT):
                idx = n0 + k * NT
                if (k + 1) * NT > BN * CV:
                    idx = cutlass.min(idx, Int32(BN * CV - 1))  # (re-copies the last piece)
                n = idx // CV
                cv = idx - n * CV
                j = cutlass.min(j0 + n, nb - 1)
                goff = cute.assume(Int64(g0 + j * D + cv * 8), divby=8)
                shi = buf * (2 * BN * self.DP) + n * self.DP + cv * 8
                self.copy_hi_lo(atom, c_hi, c_lo, goff, sC.iterator, shi, shi + BN * self.DP)
            return
        RS = NT // CV  # rows between a thread's pieces
        sbase = sC.iterator
        if self.wg:
            sbase = cute.recast_ptr(sC.iterator, None, self.dtype)  # (swizzle applied in s0)
        for k in range(BN * CV // NT):
            j = cutlass.min(j0 + n0 + k * RS, nb - 1)
            goff = cute.assume(Int64(g0 + j * D), divby=8)
            if self.wg:
                n = k * RS  # static part of the row (n0 < RS <= MN)
                shi = s0 + buf * (2 * NP * MN * D) + cute.crd2idx((n % MN, 0, n // MN), c_outer)
                slo = shi + NP * MN * D
            else:
                shi = s0 + buf * (2 * BN * self.DP) + k * RS * self.DP
                slo = shi + BN * self.DP
            self.copy_hi_lo(atom, c_hi, c_lo, goff, sbase, shi, slo)

    def copy_hi_lo(self, atom, c_hi: cute.Pointer, c_lo: cute.Pointer, goff: Int64, sbase,
                   shi: Int32, slo: Int32):
        """One 16-byte piece of a centroid row, hi and lo: element offset ``goff`` in the
        centroids (declared a whole piece), ``shi`` / ``slo`` in shared memory."""
        cute.copy(atom, cute.make_tensor(c_hi + goff, cute.make_layout(8)),
                  cute.make_tensor(sbase + cute.assume(shi, divby=8), cute.make_layout(8)))
        cute.copy(atom, cute.make_tensor(c_lo + goff, cute.make_layout(8)),
                  cute.make_tensor(sbase + cute.assume(slo, divby=8), cute.make_layout(8)))
