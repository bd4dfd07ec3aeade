"""dQ of the sm90 MoBA backward for chunks longer than one 128-key tile (Hopper): query-major
over the pairs of one (chunk, KV head), streaming the chunk's K/V tiles.

:class:`~moba_cute.kernels.moba_bwd_sm90.MobaBwdSm90` holds one chunk's K and V in shared memory
and computes dK, dV and each pair's dQ contribution in one pass; a chunk of C > 128 keys does
not fit, and splitting its keys over CTAs would give every pair one dQ partial per key tile.
Here dK/dV come from ``MobaBwdSm90(with_dq=False)`` (one CTA per 128-key tile) and this kernel
computes each pair's dQ over the whole chunk, accumulated in registers across the key tiles:

* CTA ``(g * Z + z, kvw)``: chunk ``g``, KV head ``kv0 + kvw``, sub-tiles ``z, z + Z, ...`` of
  the chunk's pair lists (the GQA group's segments, as the dK/dV kernel walks them);
* producer warpgroup: per sub-tile, Q/dO rows and row data into the ring (as the dK/dV kernel
  gathers them); warp 0 then streams the chunk's K/V tiles by TMA (``KS`` stages);
* two consumer warpgroups (64 keys of a tile each): ``S^T``, ``dP^T``, ``P^T``, ``dS^T`` as in
  the dK/dV kernel, ``dS^T`` to shared memory, ``dQ += dS K_tile`` (head dim split over the
  warpgroups); after the chunk's last tile the partial goes to the window's buffer (input dtype).

It recomputes ``S`` and ``dP`` (7 GEMMs per pair with the dK/dV kernel, against 5 in the
one-pass kernel). Compile key: ``("moba_bwd_dq_sm90", dtype, head_dim, causal)``.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import warpgroup
from cutlass.utils import LayoutEnum

from .moba_bwd_sm90 import BAR_DS, BAR_META, BM, BN, QS, MobaBwdSm90
from .moba_fwd_sm80 import store_pair
from .moba_fwd_sm90 import (acc_mn_view, gather_tma_pipelines, gemm_kblocks, kernel_prologue, kv_tma_atoms,
                           ring_state, zero_rows_from)

KS = 2  # K/V tile stages
# 168 x 384 registers at launch: the producer (gathers and the K/V stream) hands back 128 x 128,
# the consumers (no dK/dV accumulators here) take 64 more each
PRODUCER_REGS = 40
CONSUMER_REGS = 232
# both warpgroups' dQ GEMMs have read sdS (256 consumer threads; an id apart from BAR_META and
# BAR_DS, which this kernel uses too)
BAR_SDS_FREE = 7


class MobaBwdDqSm90(MobaBwdSm90):
    """Per-pair dQ partials of one (chunk, KV head) for chunks over 128 keys; see the module
    docstring."""

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, causal: bool):
        return ("moba_bwd_dq_sm90", dtype_name, int(head_dim), bool(causal))

    def _layouts(self):
        sQ, _, sdS = super()._layouts()
        dt, D = self.dtype, self.D
        atom_d = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dt, D), dt)
        sK = cute.tile_to_shape(atom_d, (BN, D, KS), order=(0, 1, 2))
        return sQ, sK, sdS

    @cute.jit
    def __call__(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer,
                 delta: cute.Pointer, part_dq: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
                 cu_chunks: cute.Pointer, offsets: cute.Pointer, pairs: cute.Pointer, B: Int32, total_q: Int32,
                 total_k: Int32, H: Int32, Hk: Int32, chunk_size: Int32, topk: Int32, kv0: Int32, Hw: Int32,
                 zsplit: Int32, nchunks: Int32, nkv: Int32, scale: Float32, scale_log2: Float32,
                 stream: cuda.CUstream):
        dt, D = self.dtype, self.D
        K_ = warpgroup.OperandMajorMode.K
        mma_sdp = sm90_utils.make_trivial_tiled_mma(dt, dt, K_, K_, Float32, (2, 1, 1), (64, BM))
        mma_dq = self._mma_dq()
        sQ_layout, sK_layout, sdS_layout = self._layouts()
        atom_k, tma_k, atom_v, tma_v, self.kv_bytes = kv_tma_atoms(k, v, total_k, Hk, D,
                                                                   cute.select(sK_layout, mode=[0, 1]), BN)
        Storage = self._storage(sQ_layout, sK_layout, sdS_layout, kv_stages=KS, dq_staging=False)

        self.kernel(
            tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, part_dq, cu_q, cu_k, cu_chunks, offsets, pairs, B,
            total_q, total_k, H, Hk, chunk_size, topk, kv0, Hw, zsplit, scale, scale_log2, sQ_layout, sK_layout,
            sdS_layout, mma_sdp, mma_dq, Storage,
        ).launch(grid=(nchunks * zsplit, nkv, 1), block=(self.THREADS, 1, 1), stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
               q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer, delta: cute.Pointer, part_dq: cute.Pointer,
               cu_q: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer, offsets: cute.Pointer,
               pairs: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32, H: Int32, Hk: Int32,
               chunk_size: Int32, topk: Int32, kv0: Int32, Hw: Int32, zsplit: Int32, scale: Float32,
               scale_log2: Float32, sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sdS_layout: cute.ComposedLayout, mma_sdp: cute.TiledMma, mma_dq: cute.TiledMma,
               Storage: cutlass.Constexpr):
        tid, _, _ = cute.arch.thread_idx()
        gz, kvw, _ = cute.arch.block_idx()
        g = gz // zsplit
        z = gz - g * zsplit
        kvh = kv0 + kvw
        warp, st = kernel_prologue(atom_k, atom_v, Storage)
        pipe_q, pipe_kv = gather_tma_pipelines(st, QS, 256, KS, 8, self.kv_bytes)
        cute.arch.mbarrier_init_fence()
        sQ, sdO, sK, sV, sdS = self.smem_views(st, sQ_layout, sK_layout, sdS_layout)
        # the whole chunk: its keys [kbeg, kbeg + ckeys) of the sequence
        qs, shift, ks, kbeg, ckeys, e_lo, e_hi, nsub = self.locate(cu_q, cu_k, cu_chunks, offsets, B, total_q,
                                                                   total_k, H, Hk, chunk_size, g, kvh, Int32(0),
                                                                   chunk_size)
        G = H // Hk
        nmine = Int32(0)  # this CTA's sub-tiles: z, z + Z, ...
        if z < nsub:
            nmine = (nsub - z + zsplit - 1) // zsplit
        ntiles = (ckeys + BN - 1) // BN
        cute.arch.sync_threads()  # barrier init visible to all warpgroups

        if warp < 4:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if ckeys > 0:
                q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, QS)
                kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, KS)
                for j in cutlass.range(nmine, unroll=1):
                    self.gather_subtile(q, dout, lse, delta, pairs, st, sQ, sdO, pipe_q, q_state, e_lo, e_hi,
                                        z + j * zsplit, total_q, H, topk, tid, warp)
                    q_state.advance()
                    if warp == 0:
                        for kt in cutlass.range(ntiles, unroll=1):
                            self.load_kv_tile(tma_k, tma_v, atom_k, atom_v, sK, sV, pipe_kv, kv_state, kvh,
                                              ks + kbeg + kt * BN)
                            kv_state.advance()
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            if ckeys > 0:
                self.dq_consumer(part_dq, st, sQ, sdO, sK, sV, sdS, pipe_q, pipe_kv, mma_sdp, mma_dq, nmine, z,
                                 zsplit, e_lo, e_hi, ckeys, ntiles, qs, shift, kbeg, H, kv0 * G, Hw, topk, scale,
                                 scale_log2, tid - 128)

    @cute.jit
    def dq_consumer(self, part_dq: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor, sK: cute.Tensor,
                    sV: cute.Tensor, sdS: cute.Tensor, pipe_q, pipe_kv, mma_sdp: cute.TiledMma,
                    mma_dq: cute.TiledMma, nmine: Int32, z: Int32, zsplit: Int32, e_lo: Int32, e_hi: Int32,
                    ckeys: Int32, ntiles: Int32, qs: Int32, shift: Int32, kbeg: Int32, H: Int32, h0: Int32,
                    Hw: Int32, topk: Int32, scale: Float32, scale_log2: Float32, ctid: Int32):
        D, dt = self.D, self.dtype
        thr_sdp = mma_sdp.get_slice(ctid)
        thr_dq = mma_dq.get_slice(ctid)
        tSrK, tSrV, tSrQ, tSrdO = self.sdp_fragments(thr_sdp, sK, sV, sQ, sdO)
        # dQ = dS K: A = dS (rows x keys), B = K^T (head dim x keys, MN-major view of each stage)
        sKt = cute.composition(sK, cute.make_ordered_layout((D, BN, KS), order=(1, 0, 2)))
        tQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS))
        tQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt))
        acc_S = cute.make_rmem_tensor(thr_sdp.partition_shape_C((BN, BM)), Float32)
        acc_dP = cute.make_rmem_tensor(thr_sdp.partition_shape_C((BN, BM)), Float32)
        acc_dQ = cute.make_rmem_tensor(thr_dq.partition_shape_C((BM, D)), Float32)
        rdS = cute.make_rmem_tensor(acc_S.layout.shape, dt)
        S_mn = acc_mn_view(acc_S)
        dP_mn = acc_mn_view(acc_dP)
        cS_mn = acc_mn_view(thr_sdp.partition_C(cute.make_identity_tensor((BN, BM))))
        dQ_mn = acc_mn_view(acc_dQ)
        cQ_mn = acc_mn_view(thr_dq.partition_C(cute.make_identity_tensor((BM, D))))
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, KS)
        for j in cutlass.range(nmine, unroll=1):
            t = z + j * zsplit
            q_state = ring_state(QS, j)
            stage = j % QS
            pipe_q.consumer_wait(q_state)
            if ctid < BM:  # last visible key of each row, relative to the chunk's first key
                self.row_meta(st, stage, ctid, e_lo + t * BM + ctid < e_hi, ckeys, qs, shift, kbeg, H, h0, Hw,
                              topk)
            cute.arch.fence_view_async_shared()
            cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)
            acc_dQ.fill(0.0)
            for kt in cutlass.range(ntiles, unroll=1):
                pipe_kv.consumer_wait(kv_state)
                ks_ = kv_state.index
                nk = cutlass.min(ckeys - kt * BN, BN)
                if nk < BN:
                    # keys past the chunk meet dS = 0 in dQ = dS K: zero them so that a
                    # non-finite key there cannot reach dQ as 0 * inf
                    zero_rows_from(sK, ks_, nk, ctid, 256, BN, D, dt)
                    cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)  # before any wgmma reads
                # ---- S^T = K Q^T, dP^T = V dO^T over this tile
                warpgroup.fence()
                gemm_kblocks(mma_sdp, acc_S, tSrK, tSrQ, ks_, stage)
                gemm_kblocks(mma_sdp, acc_dP, tSrV, tSrdO, ks_, stage)
                warpgroup.commit_group()
                warpgroup.wait_group(0)
                self.probs_and_ds(st, stage, S_mn, dP_mn, cS_mn, scale, scale_log2, kt * BN)
                rdS.store(acc_dP.load().to(dt))
                self.store_ds(sdS, acc_mn_view(rdS), cS_mn)
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=BAR_DS, number_of_threads=256)
                # ---- dQ += dS K (this warpgroup's head-dim half)
                warpgroup.fence()
                gemm_kblocks(mma_dq, acc_dQ, tQrdS, tQrKt, None, ks_, zero_init=False)
                warpgroup.commit_group()
                warpgroup.wait_group(0)
                pipe_kv.consumer_release(kv_state)
                kv_state.advance()
                # the next tile's dS^T overwrites sdS: both warpgroups' dQ GEMMs are done
                cute.arch.barrier(barrier_id=BAR_SDS_FREE, number_of_threads=256)
            self.store_dq_partials(st, stage, part_dq, dQ_mn, cQ_mn)
            pipe_q.consumer_release(q_state)

    @cute.jit
    def store_dq_partials(self, st, stage, part_dq: cute.Pointer, dQ_mn: cute.Tensor, cQ_mn: cute.Tensor):
        """The pair's dQ partial over the whole chunk, input dtype, rows of real entries only,
        straight from the fragment (4-byte stores): one store per sub-tile and chunk, against the
        one-pass kernel's one per sub-tile and 128 keys, so it does not hand them to the producer
        as that kernel does."""
        D = self.D
        sHi = st.sHi.get_tensor(cute.make_layout(BM * QS))
        sLoc = st.sLoc.get_tensor(cute.make_layout(BM * QS))
        for r in cutlass.range_constexpr(cute.size(dQ_mn, mode=[0])):
            n = cQ_mn[r, 0][0]
            if sHi[stage * BM + n] >= 0:
                base = part_dq + Int64(sLoc[stage * BM + n]) * Int64(D)
                for c in cutlass.range_constexpr(cute.size(dQ_mn, mode=[1]) // 2):
                    col = cQ_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                    store_pair(self.dtype, dQ_mn[r, 2 * c], dQ_mn[r, 2 * c + 1], base + col)
