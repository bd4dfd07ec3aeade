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
one-pass kernel). The key tiles past a sub-tile's reach (its rows' largest last visible key:
causal own-chunk rows) are skipped. Compile key: ``("moba_bwd_dq_sm90", dtype, head_dim,
causal)``, plus ``"noskip"`` without the skip.

:class:`MobaBwdDqSm90Pair` (the default, ``configs/attention_sm90.BWD_DQ_PAIR``): the same dQ
with its two consumer warpgroups on two sub-tiles that share every 64-key K/V tile, ``dS`` in
registers and FA3's ping-pong (docs/design.md, section 9); bitwise the same partials.
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

from .moba_bwd_sm90 import BAR_DS, BAR_META, BM, BN, MobaBwdSm90, warp_max_i32
from .moba_fwd_sm80 import store_pair
from .moba_fwd_sm90 import (PP_BARRIER, acc_as_a_operand, acc_mn_view, gather_tma_pipelines, gemm_kblocks,
                           kernel_prologue, kv_tma_atoms, kv_tma_views, ring_state, zero_rows_from)

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

    def __init__(self, dtype, head_dim: int, causal: bool, reach_skip: bool = True):
        super().__init__(dtype, head_dim, causal)
        self.track_reach = bool(reach_skip)  # (the streamed key tiles past a sub-tile's reach are skipped)

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, causal: bool, reach_skip: bool = True):
        return ("moba_bwd_dq_sm90", dtype_name, int(head_dim), bool(causal)) + ("noskip",) * (not reach_skip)

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
        pipe_q, pipe_kv = gather_tma_pipelines(st, self.QS, 256, KS, 8, self.kv_bytes)
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
                q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
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
            q_state = ring_state(self.QS, j)
            stage = j % self.QS
            pipe_q.consumer_wait(q_state)
            if ctid < BM:  # last visible key of each row, relative to the chunk's first key
                self.row_meta(st, stage, ctid, e_lo + t * BM + ctid < e_hi, ckeys, qs, shift, kbeg, H, h0, Hw,
                              topk)
            cute.arch.fence_view_async_shared()
            cute.arch.barrier(barrier_id=BAR_META, number_of_threads=256)
            # causal own-chunk rows see the keys up to their position only: tiles past the
            # sub-tile's reach add nothing to its dQ (both warpgroups read the same reach)
            reach = ckeys
            if cutlass.const_expr(self.track_reach):
                reach = self.sub_tile_reach(st, stage)
            acc_dQ.fill(0.0)
            for kt in cutlass.range(ntiles, unroll=1):
                pipe_kv.consumer_wait(kv_state)
                ks_ = kv_state.index
                if reach >= kt * BN:
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
                    # the next tile's dS^T overwrites sdS: both warpgroups' dQ GEMMs are done
                    cute.arch.barrier(barrier_id=BAR_SDS_FREE, number_of_threads=256)
                pipe_kv.consumer_release(kv_state)
                kv_state.advance()
            self.store_dq_partials(st, stage, part_dq, dQ_mn, cQ_mn)
            pipe_q.consumer_release(q_state)

    @cute.jit
    def store_dq_partials(self, st, stage, part_dq: cute.Pointer, dQ_mn: cute.Tensor, cQ_mn: cute.Tensor):
        """The pair's dQ partial over the whole chunk, input dtype, rows of real entries only,
        straight from the fragment (4-byte stores): one store per sub-tile and chunk, against the
        one-pass kernel's one per sub-tile and 128 keys, so it does not hand them to the producer
        as that kernel does."""
        D = self.D
        sHi = st.sHi.get_tensor(cute.make_layout(BM * self.QS))
        sLoc = st.sLoc.get_tensor(cute.make_layout(BM * self.QS))
        for r in cutlass.range_constexpr(cute.size(dQ_mn, mode=[0])):
            n = cQ_mn[r, 0][0]
            if sHi[stage * BM + n] >= 0:
                base = part_dq + Int64(sLoc[stage * BM + n]) * Int64(D)
                for c in cutlass.range_constexpr(cute.size(dQ_mn, mode=[1]) // 2):
                    col = cQ_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                    store_pair(self.dtype, dQ_mn[r, 2 * c], dQ_mn[r, 2 * c + 1], base + col)


PAIR_BN = 64  # keys per K/V tile of the pair kernel
# K and V tile stages (rings of their own): K is read until the next tile's turn (dQ += dS K is
# issued with the next S and dP), V only by this tile's dP
PAIR_KS = 3
PAIR_VS = 2
PAIR_QS = 4  # Q / dO ring stages: two per consumer warpgroup
PAIR_GATHER_ROWS = 22  # rows of a sub-tile per gathering warp (warps 1-3: 22 + 22 + 20)
BAR_KTAIL = 1  # both consumer warpgroups: a stage's K tail is zeroed
BAR_REACH = 5  # 5, 6: a warpgroup's sub-tile reach (PP_BARRIER's 3, 4 between)


class MobaBwdDqSm90Pair(MobaBwdDqSm90):
    """The dQ kernel with two consumer warpgroups on two sub-tiles sharing every K/V tile (the
    forward's pair tile, :class:`~moba_cute.kernels.moba_fwd_sm90.MobaFwdSm90Pair`, applied to
    dQ; docs/design.md, section 9).

    :class:`MobaBwdDqSm90` splits each 128-key tile's keys over its two warpgroups for one 64-row
    sub-tile, so a K/V byte that crosses the L2 -> SM crossbar feeds 64 rows, and the warpgroups
    meet at two barriers per tile (``dS`` through shared memory). Here warpgroup ``w`` takes the
    CTA's sub-tiles ``w, w + 2, ...`` and, per step, both stream the chunk's 64-key tiles:

    * ``S = Q K^T``, ``dP = dO V^T`` (SS wgmma, 64 rows x 64 keys), ``P = exp2(S * scale_log2 -
      lse_log2)`` and ``dS = P (dP - delta) * scale`` in registers (rows are the thread's own:
      their LSE, delta, last visible key and partial's place are loaded once per sub-tile);
    * ``dQ += dS K`` (RS wgmma: ``dS`` stays in registers, no shared-memory round trip), issued
      with the next tile's ``S`` and ``dP`` (FA3's intra-warpgroup overlap), and the warpgroups
      take turns issuing (ping-pong), so one's exp2 and selects run under the other's GEMMs;
    * K and V in TMA rings of their own: V's stage goes back once both ``dP`` are done, K's once
      both ``dQ`` are; producer warp 0 only streams K/V, warps 1-3 gather Q/dO rows (four
      stages: a warpgroup's next sub-tile lands while it works on this one).

    Shared memory: Q/dO 4 x 32 KB, K 3 x 16 KB, V 2 x 16 KB: 208 KB, one CTA per SM. Per key and pair
    the same three GEMMs in the same key order as :class:`MobaBwdDqSm90`, and the same skip of
    the key tiles past a sub-tile's reach (here per warpgroup). Compile key: that kernel's plus
    ``"pair"``."""

    def __init__(self, dtype, head_dim: int, causal: bool, reach_skip: bool = True):
        super().__init__(dtype, head_dim, causal, reach_skip=False)  # (its own: warpgroup_reach)
        self.pair_reach = bool(reach_skip)
        self.QS = PAIR_QS
        self.pingpong = True  # (its own loop; the row data stay in registers)

    @staticmethod
    def compile_key(dtype_name: str, head_dim: int, causal: bool, reach_skip: bool = True):
        return ("moba_bwd_dq_sm90", dtype_name, int(head_dim), bool(causal), "pair") + ("noskip",) * (not reach_skip)

    def _pair_layouts(self):
        dt, D = self.dtype, self.D
        atom_d = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dt, D), dt)
        sQ = cute.tile_to_shape(atom_d, (BM, D, self.QS), order=(0, 1, 2))
        sK = cute.tile_to_shape(atom_d, (PAIR_BN, D, PAIR_KS), order=(0, 1, 2))
        sV = cute.tile_to_shape(atom_d, (PAIR_BN, D, PAIR_VS), order=(0, 1, 2))
        return sQ, sK, sV

    def _pair_storage(self, sQ_layout, sK_layout, sV_layout):
        MR, AL = cute.struct.MemRange, cute.struct.Align
        fields = {"mbar_q": MR[cutlass.Int64, 2 * self.QS], "mbar_kv": MR[cutlass.Int64, 2 * PAIR_KS],
                  "mbar_v": MR[cutlass.Int64, 2 * PAIR_VS]}
        for name in ("sPidx", "sLse", "sDel"):  # row data of each ring stage
            fields[name] = AL[MR[Int32 if name == "sPidx" else Float32, BM * self.QS], 16]
        fields["sReach"] = AL[MR[Int32, 16], 16]  # (warpgroup_reach: 2 steps x 2 warpgroups x 4 warps)
        for name, layout in (("sQ", sQ_layout), ("sdO", sQ_layout), ("sK", sK_layout), ("sV", sV_layout)):
            fields[name] = AL[MR[self.dtype, cute.cosize(layout)], 1024]
        return cute.struct(type("Storage", (), {"__annotations__": fields}))

    @cute.jit
    def __call__(self, q: cute.Pointer, k: cute.Pointer, v: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer,
                 delta: cute.Pointer, part_dq: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
                 cu_chunks: cute.Pointer, offsets: cute.Pointer, pairs: cute.Pointer, B: Int32, total_q: Int32,
                 total_k: Int32, H: Int32, Hk: Int32, chunk_size: Int32, topk: Int32, kv0: Int32, Hw: Int32,
                 zsplit: Int32, nchunks: Int32, nkv: Int32, scale: Float32, scale_log2: Float32,
                 stream: cuda.CUstream):
        dt, D = self.dtype, self.D
        K_, MN_ = warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN
        # S = Q K^T and dP = dO V^T (SS); dQ += dS K (RS: A = dS in registers, B = K^T)
        mma_s = sm90_utils.make_trivial_tiled_mma(dt, dt, K_, K_, Float32, (1, 1, 1), (BM, PAIR_BN))
        mma_dq = sm90_utils.make_trivial_tiled_mma(dt, dt, K_, MN_, Float32, (1, 1, 1), (BM, D),
                                                   a_source=warpgroup.OperandSource.RMEM)
        sQ_layout, sK_layout, sV_layout = self._pair_layouts()
        atom_k, tma_k, atom_v, tma_v, self.kv_bytes = kv_tma_atoms(k, v, total_k, Hk, D,
                                                                   cute.select(sK_layout, mode=[0, 1]), PAIR_BN)
        Storage = self._pair_storage(sQ_layout, sK_layout, sV_layout)
        self.pair_kernel(
            tma_k, tma_v, atom_k, atom_v, q, dout, lse, delta, part_dq, cu_q, cu_k, cu_chunks, offsets, pairs, B,
            total_q, total_k, H, Hk, chunk_size, topk, kv0, Hw, zsplit, scale, scale_log2, sQ_layout, sK_layout,
            sV_layout, mma_s, mma_dq, Storage,
        ).launch(grid=(nchunks * zsplit, nkv, 1), block=(self.THREADS, 1, 1), stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def pair_kernel(self, tma_k: cute.Tensor, tma_v: cute.Tensor, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom,
                    q: cute.Pointer, dout: cute.Pointer, lse: cute.Pointer, delta: cute.Pointer,
                    part_dq: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer,
                    offsets: cute.Pointer, pairs: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32, H: Int32,
                    Hk: Int32, chunk_size: Int32, topk: Int32, kv0: Int32, Hw: Int32, zsplit: Int32,
                    scale: Float32, scale_log2: Float32, sQ_layout: cute.ComposedLayout,
                    sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout, mma_s: cute.TiledMma,
                    mma_dq: cute.TiledMma, Storage: cutlass.Constexpr):
        tid, _, _ = cute.arch.thread_idx()
        gz, kvw, _ = cute.arch.block_idx()
        g = gz // zsplit
        z = gz - g * zsplit
        kvh = kv0 + kvw
        warp, st = kernel_prologue(atom_k, atom_v, Storage)
        pipe_q, pipe_kv = gather_tma_pipelines(st, self.QS, 128, PAIR_KS, 8, self.kv_bytes,
                                               q_producers=96, v_barriers=st.mbar_v, v_stages=PAIR_VS)
        cute.arch.mbarrier_init_fence()
        sQ = st.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sdO = st.sdO.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = st.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = st.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        qs, shift, ks, kbeg, ckeys, e_lo, e_hi, nsub = self.locate(cu_q, cu_k, cu_chunks, offsets, B, total_q,
                                                                   total_k, H, Hk, chunk_size, g, kvh, Int32(0),
                                                                   chunk_size)
        nmine = Int32(0)  # this CTA's sub-tiles: z, z + Z, ...
        if z < nsub:
            nmine = (nsub - z + zsplit - 1) // zsplit
        ntiles = (ckeys + PAIR_BN - 1) // PAIR_BN
        nsteps = (nmine + 1) // 2
        cute.arch.sync_threads()  # barrier init visible to all warpgroups

        if warp < 4:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if ckeys > 0:
                if warp == 0:  # K/V only: a step's tiles once for both warpgroups
                    kv_views = kv_tma_views(atom_k, tma_k, atom_v, tma_v, sK, sV, kvh, ks + kbeg, PAIR_BN, self.D)
                    k_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, PAIR_KS)
                    v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, PAIR_VS)
                    for s in cutlass.range(nsteps, unroll=1):
                        for kt in cutlass.range(ntiles, unroll=1):
                            self.load_kv_pair(atom_k, atom_v, kv_views, pipe_kv, k_state, v_state, kt)
                            k_state.advance()
                            v_state.advance()
                else:  # warps 1-3 gather the sub-tiles in order (ring stage j % QS)
                    q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.QS)
                    rbeg = (warp - 1) * PAIR_GATHER_ROWS
                    nr = cutlass.min(PAIR_GATHER_ROWS, BM - rbeg)
                    for j in cutlass.range(nmine, unroll=1):
                        self.gather_subtile(q, dout, lse, delta, pairs, st, sQ, sdO, pipe_q, q_state, e_lo, e_hi,
                                            z + j * zsplit, total_q, H, topk, tid, warp, rbeg, nr, PAIR_GATHER_ROWS)
                        q_state.advance()
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            if ckeys > 0:
                G = H // Hk
                self.pair_consumer(part_dq, st, sQ, sdO, sK, sV, pipe_q, pipe_kv, mma_s, mma_dq, nmine, nsteps, z,
                                   zsplit, e_lo, e_hi, ckeys, ntiles, qs, shift, kbeg, H, kv0 * G, Hw, topk, scale,
                                   scale_log2, tid - 128)

    @cute.jit
    def load_kv_pair(self, atom_k: cute.CopyAtom, atom_v: cute.CopyAtom, kv_views, pipe_kv, k_state, v_state,
                     kt: Int32):
        """Warp 0: key tile ``kt`` of the chunk, K into its ring, then V into its own."""
        tKsK, tKgK, tVsV, tVgV = kv_views
        pipe_kv.k.producer_acquire(k_state)
        cute.copy(atom_k, tKgK[None, kt], tKsK[None, k_state.index],
                  tma_bar_ptr=pipe_kv.k.producer_get_barrier(k_state))
        pipe_kv.v.producer_acquire(v_state)
        cute.copy(atom_v, tVgV[None, kt], tVsV[None, v_state.index],
                  tma_bar_ptr=pipe_kv.v.producer_get_barrier(v_state))

    @cute.jit
    def wait_kv_pair(self, pipe_kv, sK: cute.Tensor, b: Int32, nk: Int32, ctid: Int32, wg: Int32):
        """Wait for K/V tile ``b`` (the step's tile with ``nk`` keys of the chunk); a short tile's K
        rows past the chunk are zeroed by warpgroup 0 before either reads them (dS is 0 there, but
        a non-finite key would reach dQ as 0 * inf)."""
        pipe_kv.k.consumer_wait(ring_state(PAIR_KS, b))
        pipe_kv.v.consumer_wait(ring_state(PAIR_VS, b))
        if nk < PAIR_BN:
            if wg == 0:
                zero_rows_from(sK, b % PAIR_KS, nk, ctid, 128, PAIR_BN, self.D, self.dtype)
            cute.arch.barrier(barrier_id=BAR_KTAIL, number_of_threads=256)

    @cute.jit
    def pair_consumer(self, part_dq: cute.Pointer, st, sQ: cute.Tensor, sdO: cute.Tensor, sK: cute.Tensor,
                      sV: cute.Tensor, pipe_q, pipe_kv, mma_s: cute.TiledMma, mma_dq: cute.TiledMma, nmine: Int32,
                      nsteps: Int32, z: Int32, zsplit: Int32, e_lo: Int32, e_hi: Int32, ckeys: Int32, ntiles: Int32,
                      qs: Int32, shift: Int32, kbeg: Int32, H: Int32, h0: Int32, Hw: Int32, topk: Int32,
                      scale: Float32, scale_log2: Float32, ctid: Int32):
        D, dt, KS, VS = self.D, self.dtype, PAIR_KS, PAIR_VS
        LOG2E = 1.4426950408889634
        wg = ctid // 128
        ctid = ctid % 128
        thr_s = mma_s.get_slice(ctid)
        thr_dq = mma_dq.get_slice(ctid)
        tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ))
        tSrdO = thr_s.make_fragment_A(thr_s.partition_A(sdO))
        tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK))
        tSrV = thr_s.make_fragment_B(thr_s.partition_B(sV))
        sKt = cute.composition(sK, cute.make_ordered_layout((D, PAIR_BN, KS), order=(1, 0, 2)))  # (K's stages)
        tQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt))
        acc_S = cute.make_rmem_tensor(thr_s.partition_shape_C((BM, PAIR_BN)), Float32)
        acc_dP = cute.make_rmem_tensor(thr_s.partition_shape_C((BM, PAIR_BN)), Float32)
        acc_dQ = cute.make_rmem_tensor(thr_dq.partition_shape_C((BM, D)), Float32)
        rdS = cute.make_rmem_tensor(acc_S.layout.shape, dt)
        tdSa = acc_as_a_operand(rdS)
        S_mn = acc_mn_view(acc_S)
        dP_mn = acc_mn_view(acc_dP)
        cS_mn = acc_mn_view(thr_s.partition_C(cute.make_identity_tensor((BM, PAIR_BN))))
        dQ_mn = acc_mn_view(acc_dQ)
        cQ_mn = acc_mn_view(thr_dq.partition_C(cute.make_identity_tensor((BM, D))))
        # this thread's rows (the same in S and dQ: a wgmma accumulator's rows depend on the
        # thread only): last visible key, partial's place, LSE (log2 domain), delta
        NR = cute.size(S_mn, mode=[0])
        hi = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
        loc = cute.make_rmem_tensor(cute.make_layout(NR), Int32)
        l2 = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        dl = cute.make_rmem_tensor(cute.make_layout(NR), Float32)
        sLse = st.sLse.get_tensor(cute.make_layout(BM * self.QS))
        sDel = st.sDel.get_tensor(cute.make_layout(BM * self.QS))
        if wg == 1:
            cute.arch.barrier_arrive(barrier_id=PP_BARRIER, number_of_threads=256)  # warpgroup 0 first
        sReach = st.sReach.get_tensor(cute.make_layout(16))
        for s in cutlass.range(nsteps, unroll=1):
            j = 2 * s + wg
            has = j < nmine
            q_state = ring_state(self.QS, j)
            qi = q_state.index
            lt = Int32(-1)  # the sub-tile's last key tile that any of its rows sees
            if has:
                pipe_q.consumer_wait(q_state)
                # cp.async wrote Q / dO (generic proxy) for wgmma (async proxy)
                cute.arch.fence_view_async_shared()
                t = z + j * zsplit
                reach = Int32(-1)
                for r in cutlass.range_constexpr(NR):
                    n = cS_mn[r, 0][0]
                    hi_r, loc_r = self.pair_place(st, qi, n, e_lo + t * BM + n < e_hi, ckeys, qs, shift, kbeg, H,
                                                  h0, Hw, topk)
                    hi[r] = hi_r
                    loc[r] = loc_r
                    l2[r] = sLse[qi * BM + n] * LOG2E
                    dl[r] = sDel[qi * BM + n]
                    reach = cutlass.max(reach, hi_r)
                lt = ntiles - 1
                if cutlass.const_expr(self.pair_reach):
                    # causal own-chunk rows see the keys up to their position: the tiles past the
                    # sub-tile's reach are skipped (their dS is zero)
                    lt = self.warpgroup_reach(sReach, reach, s, wg, ctid) // PAIR_BN
            b0 = s * ntiles
            acc_dQ.fill(0.0)
            # ---- tile 0: S and dP (dQ is zero)
            self.wait_kv_pair(pipe_kv, sK, b0, ckeys, ctid, wg)
            if has & (lt >= 0):
                self.pp_turn(wg)
                warpgroup.fence()
                gemm_kblocks(mma_s, acc_S, tSrQ, tSrK, qi, b0 % KS)
                gemm_kblocks(mma_s, acc_dP, tSrdO, tSrV, qi, b0 % VS)
                warpgroup.commit_group()
                self.pp_pass(wg)
                warpgroup.wait_group(0)
                self.pair_ds(S_mn, dP_mn, cS_mn, hi, l2, dl, Int32(0), scale, scale_log2)
                rdS.store(acc_dP.load().to(dt))
            else:
                self.pp_idle(wg)
            pipe_kv.v.consumer_release(ring_state(VS, b0))
            for kt in cutlass.range(1, ntiles, unroll=1):
                b = b0 + kt
                self.wait_kv_pair(pipe_kv, sK, b, ckeys - kt * PAIR_BN, ctid, wg)
                if has & (kt <= lt):
                    # ---- dQ += dS K of tile kt - 1, then S and dP of tile kt behind it
                    self.pp_turn(wg)
                    warpgroup.fence()
                    gemm_kblocks(mma_dq, acc_dQ, tdSa, tQrKt, None, (b - 1) % KS, zero_init=False)
                    warpgroup.commit_group()
                    gemm_kblocks(mma_s, acc_S, tSrQ, tSrK, qi, b % KS)
                    gemm_kblocks(mma_s, acc_dP, tSrdO, tSrV, qi, b % VS)
                    warpgroup.commit_group()
                    self.pp_pass(wg)
                    warpgroup.wait_group(1)  # dQ(kt - 1) done: K of tile kt - 1 can go back
                    pipe_kv.k.consumer_release(ring_state(KS, b - 1))
                    warpgroup.wait_group(0)
                    self.pair_ds(S_mn, dP_mn, cS_mn, hi, l2, dl, kt * PAIR_BN, scale, scale_log2)
                    rdS.store(acc_dP.load().to(dt))
                elif has & (kt == lt + 1):
                    # ---- the sub-tile's reach ends at tile kt - 1 (causal own-chunk rows): its dQ only
                    self.dq_turn(acc_dQ, tdSa, tQrKt, mma_dq, (b - 1) % KS, wg)
                    pipe_kv.k.consumer_release(ring_state(KS, b - 1))
                else:
                    self.pp_idle(wg)
                    pipe_kv.k.consumer_release(ring_state(KS, b - 1))
                pipe_kv.v.consumer_release(ring_state(VS, b))
            # ---- the last tile's dQ += dS K; the sub-tile's partials out
            blast = b0 + ntiles - 1
            if has & (lt == ntiles - 1):
                self.dq_turn(acc_dQ, tdSa, tQrKt, mma_dq, blast % KS, wg)
            else:
                self.pp_idle(wg)
            if has:
                pipe_q.consumer_release(q_state)
                self.store_pair_dq(part_dq, dQ_mn, cQ_mn, hi, loc)
            pipe_kv.k.consumer_release(ring_state(KS, blast))
        if wg == 0:
            # (warpgroup 1's last pass: every arrive on a barrier is matched before the exit)
            cute.arch.barrier(barrier_id=PP_BARRIER, number_of_threads=256)

    @cute.jit
    def dq_turn(self, acc_dQ: cute.Tensor, tdSa: cute.Tensor, tQrKt: cute.Tensor, mma_dq: cute.TiledMma, kstage,
                wg: Int32):
        """A turn of ``dQ += dS K`` alone (K stage ``kstage``), waited for."""
        self.pp_turn(wg)
        warpgroup.fence()
        gemm_kblocks(mma_dq, acc_dQ, tdSa, tQrKt, None, kstage, zero_init=False)
        warpgroup.commit_group()
        self.pp_pass(wg)
        warpgroup.wait_group(0)

    @cute.jit
    def warpgroup_reach(self, sReach: cute.Tensor, reach: Int32, s: Int32, wg: Int32, ctid: Int32):
        """The largest of the warpgroup's threads' ``reach`` (its sub-tile's largest last visible
        key): a warp's by shuffles, then the four warps' through shared memory (named barrier
        ``BAR_REACH + wg``; slots alternate with the step, so a warp's next write cannot meet a
        slower warp's read)."""
        reach = warp_max_i32(reach)
        base = (s % 2) * 8 + wg * 4
        idx = base + ctid // 32
        if ctid % 32 == 0:
            sReach[idx] = reach
        cute.arch.barrier(barrier_id=BAR_REACH + wg, number_of_threads=128)
        return cutlass.max(cutlass.max(sReach[base], sReach[base + 1]), cutlass.max(sReach[base + 2], sReach[base + 3]))

    @cute.jit
    def pair_ds(self, S_mn: cute.Tensor, dP_mn: cute.Tensor, cS_mn: cute.Tensor, hi: cute.Tensor, l2: cute.Tensor,
                dl: cute.Tensor, koff: Int32, scale: Float32, scale_log2: Float32):
        """In place: dP -> dS = P (dP - delta) * scale with P = exp2(S * scale_log2 - lse_log2), for
        the tile whose keys start at ``koff`` of the chunk; keys past a row's last visible key
        (and every key of a padding row, ``hi = -1``) by select, so that a non-finite S or dP
        there stays out."""
        for r in cutlass.range_constexpr(cute.size(S_mn, mode=[0])):
            lim = hi[r] - koff
            for c in cutlass.range_constexpr(cute.size(S_mn, mode=[1])):
                pv = cute.math.exp2(S_mn[r, c] * scale_log2 - l2[r], fastmath=True)
                dP_mn[r, c] = cutlass.select_(cS_mn[0, c][1] <= lim, pv * (dP_mn[r, c] - dl[r]) * scale,
                                              Float32(0.0))

    @cute.jit
    def store_pair_dq(self, part_dq: cute.Pointer, dQ_mn: cute.Tensor, cQ_mn: cute.Tensor, hi: cute.Tensor,
                      loc: cute.Tensor):
        """The sub-tile's dQ partials (whole chunk, input dtype) of its real rows, from the
        fragment (4-byte stores), as :meth:`MobaBwdDqSm90.store_dq_partials`."""
        D = self.D
        for r in cutlass.range_constexpr(cute.size(dQ_mn, mode=[0])):
            if hi[r] >= 0:
                base = part_dq + Int64(loc[r]) * Int64(D)
                for c in cutlass.range_constexpr(cute.size(dQ_mn, mode=[1]) // 2):
                    col = cQ_mn[r, 2 * c][1]  # columns 2c, 2c + 1 are adjacent
                    store_pair(self.dtype, dQ_mn[r, 2 * c], dQ_mn[r, 2 * c + 1], base + col)
