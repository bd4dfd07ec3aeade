"""Tiled centroid top-k routing kernel (CuTe DSL, mma.sync on sm80 and sm90).

One CTA of ``BM`` threads handles ``BM`` packed query rows of one sequence and one KV head
(``BM/32`` warps): packed row ``m`` is (position ``m // G``, query head ``hk * G + m % G``), so
a centroid tile in shared memory is reused by all ``G`` query heads of the KV group. The CTA
walks the tiles of ``BN`` centroids of its sequence in ascending chunk order
(double-buffered ``cp.async``) and scores them on the tensor cores with a hi/lo split of the
fp32 centroid (``q*c_hi + q*c_lo``, fp32 accumulation, so scores carry ~fp32 precision). For
head dims up to 128 the query fragments are loaded into registers once (the query tile's
shared memory is then reused for the score tile).

Selection (one thread per row, running list in registers for list capacities up to 16):
the ``BN`` scores of a row are compared with the row's running threshold (its current L-th
best) and only the passing columns, kept as a bit mask, go through the insertion network,
lowest column first. A warp therefore runs the network about as many times as the busiest of
its rows has insertions in the tile, instead of once per column. The score matrix never
leaves the SM, and the thread writes its row of the selection in the order of
:mod:`moba_cute.routing` (causal: own chunk in slot 0, then descending score; ties go to the
larger chunk index; ``-1`` padding).

Ties: candidates arrive in ascending chunk order, so ``v >= threshold`` (and ``>=`` in the
network) lets the later (larger-index) chunk win.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, Int64, Float32, Uint32
from cutlass.cute.nvgpu import cpasync, warp

from .centroids import clamp_seq, find_segment


class TopkRoutingKernel:
    """Compile key: ("topk", dtype, head_dim, list_cap, causal, BM, BN, arch)."""

    def __init__(self, dtype, head_dim: int, list_cap: int, causal: bool, bm: int = 128, bn: int = 32):
        assert head_dim % 16 == 0 or head_dim in (96,)
        assert bm in (64, 128) and bn in (16, 32)
        self.dtype = dtype
        self.D = head_dim
        # static capacity of a running list: exactly the runtime list length for register lists
        # (<= 16), >= it for shared-memory lists
        self.L = list_cap
        self.causal = causal
        self.BM = bm
        self.BN = bn
        self.nthr = bm  # one thread per row in the selection
        self.nwarps = bm // 32
        self.DP = head_dim + 8  # padded smem row (16 B pad: conflict-free ldmatrix)
        self.SP = bm + 4  # score tile column stride (= 4 mod 32: conflict-free writes and reads)
        self.hoist = head_dim <= 128  # query fragments live in registers
        self.reg_lists = list_cap <= 16
        if self.hoist:
            assert bn * self.SP * 4 <= bm * self.DP * 2  # score tile fits in the query tile

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
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)),
            (self.nwarps, 1, 1),
            permutation_mnk=(self.nwarps * 16, 16, 16),
        )
        self.kernel(
            q, c_hi, c_lo, cu_q, cu_k, cu_chunks, cu_mtiles, sel, B, total_q, total_k, H, Hk,
            chunk_size, topk, chunk_bound, mtile_bound, rows_per_tile, tiled_mma,
        ).launch(grid=(mtile_bound * Hk, 1, 1), block=(self.nthr, 1, 1), stream=stream)

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
        D = self.D
        DP = self.DP
        SP = self.SP
        NT = self.nthr
        LC = self.L
        CV = D // 8
        dt = self.dtype

        smem = cutlass.utils.SmemAllocator()
        q_layout = cute.make_layout((BM, D), stride=(DP, 1))
        c_layout = cute.make_layout((BN, D), stride=(DP, 1))
        sC = smem.allocate_tensor(dt, cute.make_layout(4 * BN * DP), 128)  # [stage][hi/lo]
        sQ = smem.allocate_tensor(dt, q_layout, 128)
        if cutlass.const_expr(self.hoist):
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
            hk_base = Int64(hk) * Int64(chunk_bound) * Int64(D)
            if ntiles > 0:
                # ---- Q tile -> smem (rows past the tile are clamped to a valid row; never stored)
                row_stride_q = Int64(H) * Int64(D)
                for idx in cutlass.range(tid, BM * CV, NT):
                    r = idx // CV
                    cv = idx % CV
                    m = m0 + r
                    if m >= m_end:
                        m = m0
                    pos = m // G
                    hg = m % G
                    off = (Int64(qs) + Int64(pos)) * row_stride_q + Int64(hk * G + hg) * Int64(D) + Int64(cv * 8)
                    src = cute.make_tensor((q + off).align(16), cute.make_layout(8))
                    dst = cute.make_tensor((sQ.iterator + (r * DP + cv * 8)).align(16), cute.make_layout(8))
                    cute.copy(atom_g2s, src, dst)
                cute.arch.cp_async_commit_group()
                self.load_ctile(atom_g2s, c_hi, c_lo, sC, Int32(0), Int32(0), hk_base, cc0, nb, tid)
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

            # ---- MMA partitions
            thr_mma = tiled_mma.get_slice(tid)
            tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
            sC0 = cute.make_tensor(sC.iterator, c_layout)
            tSrC = thr_mma.make_fragment_B(thr_mma.partition_B(sC0))
            tSrC2 = thr_mma.make_fragment_B(thr_mma.partition_B(sC0))
            acc_shape = thr_mma.partition_shape_C((BM, BN))
            acc = cute.make_rmem_tensor(acc_shape, Float32)
            ld_atom = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
            s2r_A = cute.make_tiled_copy_A(ld_atom, tiled_mma)
            s2r_B = cute.make_tiled_copy_B(ld_atom, tiled_mma)
            thr_A = s2r_A.get_slice(tid)
            thr_B = s2r_B.get_slice(tid)
            tSsQ = thr_A.partition_S(sQ)
            tSrQ_v = thr_A.retile(tSrQ)
            tSrC_v = thr_B.retile(tSrC)
            tSrC2_v = thr_B.retile(tSrC2)
            cS = cute.make_identity_tensor((BM, BN))
            tScS = thr_mma.partition_C(cS)
            NKB = cute.size(tSsQ.shape[2])

            if cutlass.const_expr(self.hoist):
                if ntiles > 0:
                    cute.arch.cp_async_wait_group(1)
                    cute.arch.sync_threads()
                    for kb in cutlass.range_constexpr(NKB):
                        cute.copy(s2r_A, tSsQ[None, None, kb], tSrQ_v[None, None, kb])

            for t in cutlass.range(ntiles):
                stage = t % 2
                if t + 1 < ntiles:
                    self.load_ctile(atom_g2s, c_hi, c_lo, sC, (t + 1) * BN, 1 - stage, hk_base, cc0, nb, tid)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(1)
                cute.arch.sync_threads()

                sHi = cute.make_tensor((sC.iterator + (stage * 2) * (BN * DP)).align(16), c_layout)
                sLo = cute.make_tensor((sC.iterator + (stage * 2 + 1) * (BN * DP)).align(16), c_layout)
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
                    sS[rc[1] * SP + rc[0]] = acc[i]
                cute.arch.sync_threads()

                # ---- my row: which of the BN columns beat the running threshold
                j0 = t * BN
                mask = Uint32(0)
                for cc in cutlass.range_constexpr(BN):
                    v = sS[cc * SP + tid]
                    mask = mask | Uint32(cutlass.select_(v >= thr, Uint32(1 << cc), Uint32(0)))
                rel = my_lim - j0
                if rel < BN:
                    mask = mask & ((Uint32(1) << Uint32(cutlass.max(rel, Int32(0)))) - Uint32(1))
                # ---- insert the passing columns, lowest chunk first (threshold re-checked)
                while mask != Uint32(0):
                    low = mask & (~mask + Uint32(1))
                    c = Int32(cute.arch.popc(low - Uint32(1)))
                    mask = mask ^ low
                    x = sS[c * SP + tid]
                    if x >= thr:
                        xi = j0 + c
                        if cutlass.const_expr(self.reg_lists):
                            # parallel insertion into the descending list: all compares are
                            # independent (x >= v[s] is monotone in s), each slot takes x, its
                            # upper neighbour or itself; same result as the sequential
                            # compare-and-swap chain (ties: x goes above equal entries), but the
                            # dependency chain is 3 deep instead of 2 * LC
                            ov = [rlv[s] for s in range(LC)]
                            oi = [rli[s] for s in range(LC)]
                            ge = [x >= ov[s] for s in range(LC)]
                            for s in cutlass.range_constexpr(LC):
                                if cutlass.const_expr(s == 0):
                                    rlv[s] = cutlass.select_(ge[s], x, ov[s])
                                    rli[s] = cutlass.select_(ge[s], xi, oi[s])
                                else:
                                    up_v = cutlass.select_(ge[s - 1], ov[s - 1], x)
                                    up_i = cutlass.select_(ge[s - 1], oi[s - 1], xi)
                                    rlv[s] = cutlass.select_(ge[s], up_v, ov[s])
                                    rli[s] = cutlass.select_(ge[s], up_i, oi[s])
                            # register lists are compiled for their exact length (L == LC)
                            thr = rlv[LC - 1]
                        else:
                            pos = Lm1
                            live = Int32(1)
                            for st in cutlass.range(Lm1):
                                s = Lm1 - st
                                if live != 0:
                                    pv = sLv[(s - 1) * NT + tid]
                                    if x >= pv:
                                        sLv[s * NT + tid] = pv
                                        sLi[s * NT + tid] = sLi[(s - 1) * NT + tid]
                                        pos = s - 1
                                    else:
                                        live = Int32(0)
                            sLv[pos * NT + tid] = x
                            sLi[pos * NT + tid] = xi
                            thr = sLv[Lm1 * NT + tid]

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
    def load_ctile(self, atom, c_hi: cute.Pointer, c_lo: cute.Pointer, sC: cute.Tensor,
                   j0: Int32, stage: Int32, hk_base: Int64, cc0: Int32, nb: Int32, tid: Int32):
        BN = self.BN
        DP = self.DP
        CV = self.D // 8
        for idx in cutlass.range(tid, BN * CV, self.nthr):
            n = idx // CV
            cv = idx % CV
            j = cutlass.min(j0 + n, nb - 1)
            off = hk_base + Int64(cc0 + j) * Int64(self.D) + Int64(cv * 8)
            soff = n * DP + cv * 8
            src = cute.make_tensor((c_hi + off).align(16), cute.make_layout(8))
            dst = cute.make_tensor((sC.iterator + ((stage * 2) * (BN * DP) + soff)).align(16), cute.make_layout(8))
            cute.copy(atom, src, dst)
            src2 = cute.make_tensor((c_lo + off).align(16), cute.make_layout(8))
            dst2 = cute.make_tensor((sC.iterator + ((stage * 2 + 1) * (BN * DP) + soff)).align(16), cute.make_layout(8))
            cute.copy(atom, src2, dst2)
