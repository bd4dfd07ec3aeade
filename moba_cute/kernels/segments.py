"""Work-unit geometry shared by the attention kernels (CuTe DSL): which query rows and keys a
CTA owns, for the key-major gather kernels (sm80 forward slot passes and dQ passes, sm90
segment forward) and the query-major causal diagonal (sm80 forward and dQ, sm90 forward), the
row tables the sm80 kernels keep in shared memory (global row, first and last visible key per tile
row), and the diagonal forwards' ``out``/``lse`` of rows without a key position.

Everything is clamped as the index kernels clamp it (``centroids.clamp_seq``): garbage
``cu_seqlens`` give empty units, never an access out of bounds.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from .centroids import clamp_seq, find_segment


def _flat(ptr):
    return cute.make_tensor(ptr, cute.make_layout(1 << 30))


@cute.jit
def segment_unit(tiles: cute.Pointer, tile_seg: cute.Pointer, seg_off: cute.Pointer, tile_off: cute.Pointer,
                 seg_start: cute.Pointer, cu_k: cute.Pointer, cu_chunks: cute.Pointer, T: Int32,
                 rows_per_unit: Int32, seg_base: Int32, B: Int32, total_k: Int32, H: Int32, chunk_size: Int32,
                 kv_major: cutlass.Constexpr = False, Hk: Int32 = 1, nbound: Int32 = 0, nrw: Int32 = 0,
                 wstart: cute.Pointer = None):
    """Work unit ``T`` of a key-major gather launch (``tiles`` = [first, end) units): its first
    index entry, entry count, head, and the chunk's key range ``[ks + kbeg, ks + kend)``.
    Segment ``sp`` (``sp - seg_base = g * H + h``) holds ``seg_off[sp + 1] - seg_off[sp]``
    entries from ``seg_start[sp]`` (the same array as ``seg_off`` for packed lists).
    ``kv_major`` (the sm90 forward's windowed order, ``PairListKernel(head_major=True)``):
    ``sp = (kvh * nbound + g) * G + h % G`` (``G = H / Hk``) and the entries start at
    ``seg_start[g * H + h]`` (the routing's chunk-major offsets); with windows of query rows
    (``nrw > 0`` windows per head, :class:`~moba_cute.kernels.slot_index.WindowCountKernel`)
    ``sp = (h * nrw + rw) * nbound + g`` and the window's entries start ``wstart[sp]`` further.
    ``nrows == 0`` for units past the end or of empty chunks (garbage cu_seqlens)."""
    tq = _flat(tiles)
    r0 = Int32(0)
    nrows = Int32(0)
    h = Int32(0)
    ks = Int32(0)
    kbeg = Int32(0)
    kend = Int32(0)
    if T < tq[1]:
        sp = _flat(tile_seg)[T]
        tso = _flat(seg_off)
        seg = sp - seg_base
        g = Int32(0)
        o = Int32(0)
        if cutlass.const_expr(kv_major):
            if nrw > 0:
                hw = seg // nbound
                g = seg - hw * nbound
                h = hw // nrw
                o = _flat(seg_start)[g * H + h] + _flat(wstart)[seg]
            else:
                G = H // Hk
                kvh = seg // (nbound * G)
                rem = seg - kvh * (nbound * G)
                g = rem // G
                h = kvh * G + (rem - g * G)
                o = _flat(seg_start)[g * H + h]
        else:
            g = seg // H
            h = seg - g * H
            o = _flat(seg_start)[sp]
        n = tso[sp + 1] - tso[sp]
        r0 = o + (T - _flat(tile_off)[sp]) * rows_per_unit
        nrows = cutlass.min(rows_per_unit, o + n - r0)
        b = find_segment(cu_chunks, B, g)
        ks, ke = clamp_seq(cu_k, b, total_k)
        j = g - _flat(cu_chunks)[b]
        kbeg = j * chunk_size
        kend = cutlass.min(kbeg + chunk_size, ke - ks)
        if kbeg >= kend:
            nrows = Int32(0)
    return r0, nrows, h, ks, kbeg, kend


@cute.jit
def diag_tile(cu_mt: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer, B: Int32, total_q: Int32,
              total_k: Int32, chunk_size: Int32, T: Int32, BM: cutlass.Constexpr):
    """Query tile ``T`` of the causal diagonal (``cu_mt[b]``: sequence b's first tile of ``BM``
    rows, ``cu_mt[B]``: all tiles). Returns the sequence's first query row ``qs`` and key
    ``ks``, the bottom-right shift ``Sk - Sq`` (local row ``i`` sees keys up to ``i + shift``),
    the tile's first local row ``m0``, its rows with a key position ``[i_lo, i_hi)`` (the
    ``i_lo - m0`` rows before them see no key) and the keys those rows need, ``[kbeg, kend)``
    from ``ks`` (from the start of the first row's chunk). Past the last tile all are 0."""
    tq = _flat(cu_mt)
    qs = Int32(0)
    ks = Int32(0)
    shift = Int32(0)
    m0 = Int32(0)
    i_lo = Int32(0)
    i_hi = Int32(0)
    kbeg = Int32(0)
    kend = Int32(0)
    ntot = Int32(0)
    if B > 0:
        ntot = tq[B]
    if T < ntot:
        b = find_segment(cu_mt, B, T)
        qs, qe = clamp_seq(cu_q, b, total_q)
        ks, ke = clamp_seq(cu_k, b, total_k)
        sq = qe - qs
        shift = (ke - ks) - sq
        m0 = (T - tq[b]) * BM
        i_hi = cutlass.min(m0 + BM, sq)
        i_lo = cutlass.min(cutlass.max(m0, -shift), i_hi)
        if i_lo < i_hi:
            kbeg = ((i_lo + shift) // chunk_size) * chunk_size
            kend = i_hi + shift
    return qs, ks, shift, m0, i_lo, i_hi, kbeg, kend


@cute.jit
def zero_rows_without_keys(out: cute.Pointer, lse: cute.Pointer, qs: Int32, m0: Int32, i_lo: Int32, h: Int32,
                           H: Int32, total_q: Int32, tid: Int32, nthr: cutlass.Constexpr, D: cutlass.Constexpr,
                           dtype: cutlass.Constexpr):
    """``out = 0`` (16-byte stores) and ``lse = -inf`` for a diagonal tile's rows ``m0 .. i_lo``
    of the sequence starting at ``qs``, head ``h`` (:func:`diag_tile`: no key position, the query
    is longer than the keys), by ``nthr`` threads from ``tid``."""
    CV = D // 8
    for idx in cutlass.range(tid, (i_lo - m0) * CV, nthr, unroll=1):
        r = idx // CV
        cv = idx - r * CV
        zrow = qs + m0 + r
        zero = cute.make_rmem_tensor(cute.make_layout(8), dtype)
        zero.fill(0.0)
        off = (Int64(zrow) * Int64(H) + Int64(h)) * Int64(D) + Int64(cv * 8)
        cute.autovec_copy(zero, cute.make_tensor(out + cute.assume(off, divby=8), cute.make_layout(8)))
        if cv == 0:
            _flat(lse)[Int64(h) * Int64(total_q) + Int64(zrow)] = -Float32.inf


@cute.jit
def diag_row_table(sRow: cute.Tensor, sLo: cute.Tensor, sHi: cute.Tensor, tid: Int32, BM: cutlass.Constexpr,
                   qs: Int32, m0: Int32, i_lo: Int32, i_hi: Int32, shift: Int32, chunk_size: Int32):
    """Row table of a diagonal tile (thread ``tid < BM`` writes row ``tid``): global row, and
    the visible keys of its own chunk up to its position; rows without keys repeat a loadable
    row with an empty range (lo > hi)."""
    if tid < BM:
        i = m0 + tid
        if (i >= i_lo) & (i < i_hi):
            p = i + shift
            sRow[tid] = qs + i
            sLo[tid] = (p // chunk_size) * chunk_size
            sHi[tid] = p
        else:
            sRow[tid] = qs + i_lo
            sLo[tid] = Int32(1)
            sHi[tid] = Int32(0)


@cute.jit
def gather_row_table(sRow: cute.Tensor, sLo: cute.Tensor, sHi: cute.Tensor, tid: Int32, BM: cutlass.Constexpr,
                     rows_list: cute.Pointer, r0: Int32, nrows: Int32, kbeg: Int32, kend: Int32):
    """Row table of a gather unit: entries ``rows_list[r0 : r0 + nrows]`` see the whole chunk
    ``[kbeg, kend)``; padding rows repeat the first entry with an empty range."""
    if tid < BM:
        trl = _flat(rows_list)
        if tid < nrows:
            sRow[tid] = trl[r0 + tid]
            sLo[tid] = kbeg
            sHi[tid] = kend - 1
        else:
            sRow[tid] = trl[r0]
            sLo[tid] = Int32(1)
            sHi[tid] = Int32(0)


@cute.jit
def pass_rows(diag: cutlass.Constexpr, sRow: cute.Tensor, sLo: cute.Tensor, sHi: cute.Tensor, tid: Int32,
              BM: cutlass.Constexpr, tiles: cute.Pointer, cu_q: cute.Pointer, cu_k: cute.Pointer,
              cu_chunks: cute.Pointer, tile_seg: cute.Pointer, seg_off: cute.Pointer, tile_off: cute.Pointer,
              rows_list: cute.Pointer, B: Int32, total_q: Int32, total_k: Int32, H: Int32, chunk_size: Int32,
              bid: Int32, by: Int32, seg_base: Int32):
    """Tile ``bid`` of an sm80 slot pass (forward or dQ): the causal diagonal (``diag``: query
    tile ``bid`` of head ``by``) or gather unit ``tiles[0] + bid`` of segments from
    ``seg_base``. Writes the tile's row table and returns ``(valid, h, ks, kbeg, kend, qs, m0,
    i_lo)``; for the diagonal, tile rows ``m0 .. i_lo`` of the sequence starting at ``qs`` have
    no key position (the forward writes them ``out = 0``, ``lse = -inf``)."""
    valid = Int32(0)
    h = Int32(0)
    ks = Int32(0)
    kbeg = Int32(0)
    kend = Int32(0)
    qs = Int32(0)
    m0 = Int32(0)
    i_lo = Int32(0)
    if cutlass.const_expr(diag):
        h = by
        qs, ks, shift, m0, i_lo, i_hi, kbeg, kend = diag_tile(tiles, cu_q, cu_k, B, total_q, total_k, chunk_size,
                                                              bid, BM)
        if i_lo < i_hi:
            valid = Int32(1)
            diag_row_table(sRow, sLo, sHi, tid, BM, qs, m0, i_lo, i_hi, shift, chunk_size)
    else:
        T = _flat(tiles)[0] + bid
        r0, nrows, h, ks, kbeg, kend = segment_unit(tiles, tile_seg, seg_off, tile_off, seg_off, cu_k, cu_chunks, T,
                                                    Int32(BM), seg_base, B, total_k, H, chunk_size)
        if nrows > 0:
            valid = Int32(1)
            gather_row_table(sRow, sLo, sHi, tid, BM, rows_list, r0, nrows, kbeg, kend)
    return valid, h, ks, kbeg, kend, qs, m0, i_lo
