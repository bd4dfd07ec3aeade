"""Host side of the CuTe MoBA attention forward and backward (sm80 mma.sync kernels; also run on sm90).

``attention_cute(q, k, v, routing, softmax_scale, deterministic) -> (out, lse)`` runs, on the
caller's stream and without host synchronization (every size comes from shapes and host-known
bounds):

1. :class:`~moba_cute.kernels.slot_index.SlotIndexKernel` (count): ``nused`` per (row, head),
   per-slot segment counts.
2. torch ``cumsum`` / ``searchsorted`` (device ops, no sync): segment offsets, tiles per
   segment, the tile -> segment table and each pass's tile range.
3. :class:`SlotIndexKernel` (scatter): the per-slot row lists.
4. causal: the dense diagonal pass (own chunks, query-major tiles, exact causal mask).
5. one gather pass per remaining routing slot, in slot order (``topk - 1`` causal, ``topk``
   non-causal launches), each read-modify-writing the fp32 running state of its rows; a row's
   last used slot writes ``out`` and ``lse``.

Extra memory (freed on return): ``O_acc`` fp32 ``total_q*H*D*4`` bytes and ``m, l, nused``
``3*total_q*H*4`` bytes when ``topk > 1``; the row lists ``total_q*H*(passes)*4`` bytes; segment
counters/offsets ``~3*passes*num_chunks_bound*H*4``; the tile table
``passes*(total_q*H/BM + num_chunks_bound*H)*4`` bytes. See docs/design.md.

Backward: ``attention_backward_cute(q, k, v, out, lse, dout, dlse, routing, softmax_scale,
deterministic) -> (dq, dk, dv)`` (``HAS_BACKWARD = True``; the interface's autograd function
calls it): ``delta = rowsum(dO * O) - dlse`` (torch, bounded row slices), the key-major dK/dV
kernel, the per-slot index rebuilt, the dQ diagonal + gather passes over a zeroed fp32
``dQ_acc``, then ``dq = dQ_acc`` cast. Always bitwise deterministic. Extra memory (freed on
return): ``dQ_acc`` ``total_q*H*D*4`` bytes, ``delta`` + ``nused`` ``2*total_q*H*4``, the row
lists and tables as in the forward (docs/design.md section 5).

Timing on a GPU (forward, backward, forward + backward, FA2 baselines):
``python -m moba_cute.kernels.attention_launch --bench``.
"""

from __future__ import annotations

import re

import torch

from ..configs import attention_sm80 as cfg
from . import common

__all__ = ["attention_cute", "attention_backward_cute", "attention_unsupported_reason", "kernel_specs",
           "bwd_kernel_specs", "HAS_BACKWARD"]

HAS_BACKWARD = True

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
INT32_MAX = 2**31 - 1


def attention_unsupported_reason(dtype, head_dim, chunk_size, topk, arch):
    """None if the CuTe forward supports the configuration, else a short reason."""
    if dtype not in _DTYPES:
        return f"attention kernels support float16/bfloat16, not {dtype}"
    if head_dim not in cfg.FWD_TILES:
        return f"attention kernels support head dims {cfg.SUPPORTED_HEAD_DIMS}, not {head_dim}"
    if not (1 <= int(topk) <= 64):
        return f"attention kernels support 1 <= topk <= 64, not {topk}"
    if int(chunk_size) < 1 or int(chunk_size) % 16 != 0:
        return f"attention kernels need chunk_size a positive multiple of 16, not {chunk_size}"
    m = re.match(r"sm_?(\d+)", str(arch))
    if m is None or int(m.group(1)) < 80:
        return f"attention kernels need sm80 or newer, not {arch}"
    bm, bn, _, st = tiles(head_dim)
    if cfg.fwd_smem_bytes(head_dim, bm, bn, st) > cfg.SMEM_LIMIT:
        return f"forward tile for head_dim={head_dim} needs too much shared memory"
    for tab in (cfg.BWD_DKV_TILES, cfg.BWD_DQ_TILES):
        bbm, bbn, _ = tab[head_dim]
        if cfg.bwd_smem_bytes(head_dim, bbm, bbn) > cfg.SMEM_LIMIT:
            return f"backward tile for head_dim={head_dim} needs too much shared memory"
    return None


def tiles(head_dim):
    """(bm, bn, threads, stages) for a head dim; ``MOBA_CUTE_FWD_STAGES`` overrides stages."""
    import os

    bm, bn, nt, st = cfg.FWD_TILES[head_dim]
    env = os.environ.get("MOBA_CUTE_FWD_STAGES")
    if env:
        st = int(env)
    return bm, bn, nt, st


def _i32(x, what):
    if x > INT32_MAX:
        raise ValueError(f"moba_cute attention: {what} = {x} exceeds 2^31-1 (not supported by the sm80 forward)")
    return int(x)


# --- compile specs (shared with tests/test_attention_compile.py) ------------------------------

def _cdt(name):
    import cutlass

    return {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[name]


def fake_args_fwd(dt):
    import cutlass

    I, F = cutlass.Int32, cutlass.Float32
    P = common.fake_gptr
    return (
        (P(dt, 16), P(dt, 16), P(dt, 16), P(dt, 16), P(F, 4), P(F, 16), P(F, 4), P(F, 4))
        + tuple(P(I, 4) for _ in range(9))
        + tuple(I(1) for _ in range(10))
        + (F(1.0), common.fake_stream())
    )


def fake_args_index(dt):
    import cutlass

    I = cutlass.Int32
    P = common.fake_gptr
    return (P(I, 4), P(I, 4), P(I, 4), P(I, 4), P(I, 4), P(I, 4), P(dt, 16), P(cutlass.Float32, 4)) + tuple(
        I(1) for _ in range(6)
    ) + (common.fake_stream(),)


def kernel_specs(dtype_name, head_dim, causal, stages=None):
    """(key, factory, fake args) of every kernel a forward call with this config compiles."""
    from .moba_fwd_sm80 import MobaFwdSm80
    from .slot_index import SlotIndexKernel

    dt = _cdt(dtype_name)
    bm, bn, nt, st = tiles(head_dim)
    if stages is not None:
        st = stages
    specs = []
    variants = [(True, True), (False, False)] if causal else [(False, True), (False, False)]
    for diag, first in variants:
        key = MobaFwdSm80.compile_key(dtype_name, head_dim, diag, first, bm, bn, nt, st)
        specs.append((key, (lambda d=diag, f=first: MobaFwdSm80(dt, head_dim, d, f, bm, bn, nt, st)),
                      fake_args_fwd(dt)))
    for scatter in (False, True):
        specs.append(
            (("slotidx", scatter, bool(causal), dtype_name, head_dim),
             (lambda s=scatter: SlotIndexKernel(s, causal, dt, head_dim)), fake_args_index(dt))
        )
    return specs


def fake_args_dkv(dt):
    import cutlass

    I, F = cutlass.Int32, cutlass.Float32
    P = common.fake_gptr
    return (
        (P(dt, 16), P(dt, 16), P(dt, 16), P(dt, 16), P(F, 4), P(F, 4), P(dt, 16), P(dt, 16))
        + tuple(P(I, 4) for _ in range(5))
        + tuple(I(1) for _ in range(8))
        + (F(1.0), F(1.0), common.fake_stream())
    )


def fake_args_dq(dt):
    import cutlass

    I, F = cutlass.Int32, cutlass.Float32
    P = common.fake_gptr
    return (
        (P(dt, 16), P(dt, 16), P(dt, 16), P(dt, 16), P(F, 4), P(F, 4), P(F, 16))
        + tuple(P(I, 4) for _ in range(8))
        + tuple(I(1) for _ in range(9))
        + (F(1.0), F(1.0), common.fake_stream())
    )


def bwd_kernel_specs(dtype_name, head_dim, causal):
    """(key, factory, fake args) of every kernel a backward call with this config compiles
    (the slot index kernels are shared with the forward: see :func:`kernel_specs`)."""
    from .moba_bwd_sm80 import MobaBwdDkvSm80, MobaBwdDqSm80
    from .slot_index import SlotIndexKernel

    dt = _cdt(dtype_name)
    kbm, kbn, knt = cfg.BWD_DKV_TILES[head_dim]
    qbm, qbn, qnt = cfg.BWD_DQ_TILES[head_dim]
    specs = [(MobaBwdDkvSm80.compile_key(dtype_name, head_dim, causal, kbm, kbn, knt),
              (lambda: MobaBwdDkvSm80(dt, head_dim, causal, kbm, kbn, knt)), fake_args_dkv(dt))]
    for diag in ((True, False) if causal else (False,)):
        specs.append((MobaBwdDqSm80.compile_key(dtype_name, head_dim, diag, qbm, qbn, qnt),
                      (lambda d=diag: MobaBwdDqSm80(dt, head_dim, d, qbm, qbn, qnt)), fake_args_dq(dt)))
    for scatter in (False, True):
        specs.append(
            (("slotidx", scatter, bool(causal), dtype_name, head_dim),
             (lambda s=scatter: SlotIndexKernel(s, causal, dt, head_dim)), fake_args_index(dt))
        )
    return specs


def _compiled(key, factory, fake, arch):
    import cutlass.cute as cute

    def build():
        return cute.compile(factory(), *fake, options=common.compile_options(arch))

    return common.cached_compile(key + (arch,), build)


def _kernels(dtype, head_dim, causal, arch):
    specs = kernel_specs(_DTYPES[dtype], head_dim, causal)
    return {s[0]: _compiled(s[0], s[1], s[2], arch) for s in specs}


def _p(t, align=16):
    return common.gptr(t, align=align)


def _slot_index(ks, sel, cu_q, cu_chunks, out, lse, B, total_q, H, K, nseg, causal, bm, dt_name, D, stream, dev):
    """The per-slot key-major index of the gather passes (forward and dQ backward): ``nused``,
    segment offsets, tile offsets, the tile -> segment table, each pass's tile range and the
    row lists (docs/design.md section 3). Non-causal rows with no usable slot get
    ``out = 0, lse = -inf`` (the same values on a rebuild in the backward)."""
    i32 = torch.int32
    s0 = 1 if causal else 0
    npass = K - s0
    rows_tot = total_q * H
    nused = torch.empty(rows_tot, dtype=i32, device=dev)
    nblk = (rows_tot + 255) // 256
    bound_pass = (rows_tot + bm - 1) // bm + min(nseg, rows_tot)
    counts = torch.zeros(max(npass * nseg, 1), dtype=i32, device=dev)
    rows_list = torch.empty(max(rows_tot * npass, 1), dtype=i32, device=dev)
    idx_args = (_p(sel, 4), _p(cu_q, 4), _p(cu_chunks, 4))
    tail = (_p(nused, 4), _p(out), _p(lse, 4), B, total_q, H, K, nseg, nblk, stream)
    ks[("slotidx", False, causal, dt_name, D)](*idx_args, _p(counts, 4), _p(rows_list, 4), *tail)
    if npass > 0:
        seg_off = torch.zeros(npass * nseg + 1, dtype=i32, device=dev)
        torch.cumsum(counts, 0, dtype=i32, out=seg_off[1:])
        tiles_incl = torch.cumsum((counts + (bm - 1)) // bm, 0, dtype=i32)
        tile_off = torch.zeros(npass * nseg + 1, dtype=i32, device=dev)
        tile_off[1:] = tiles_incl
        pass_tiles = tile_off[torch.arange(npass + 1, device=dev) * nseg].contiguous()
        n_tiles_bound = npass * bound_pass
        _i32(n_tiles_bound, "tile table")
        tile_seg = torch.searchsorted(
            tiles_incl, torch.arange(n_tiles_bound, device=dev, dtype=i32), right=True, out_int32=True
        )
        cursor = seg_off[:-1].clone()
        ks[("slotidx", True, causal, dt_name, D)](*idx_args, _p(cursor, 4), _p(rows_list, 4), *tail)
    else:
        dummy = torch.zeros(4, dtype=i32, device=dev)
        seg_off = tile_off = tile_seg = pass_tiles = dummy
    return nused, seg_off, tile_off, tile_seg, pass_tiles, rows_list, bound_pass


def attention_cute(q, k, v, routing, softmax_scale, deterministic, *, out=None, lse=None):
    """MoBA forward with the CuTe kernels. Returns ``out`` (total_q, H, D) in q's dtype and the
    fp32 ``lse`` (H, total_q). Deterministic whatever ``deterministic`` says. ``out``/``lse``
    may be given (contiguous, right shape and dtype): tests pass NaN-filled buffers."""
    del deterministic  # the slot-pass schedule is deterministic by construction
    q = q if q.is_contiguous() else q.contiguous()
    k = k if k.is_contiguous() else k.contiguous()
    v = v if v.is_contiguous() else v.contiguous()
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    dev = q.device
    C = int(routing.chunk_size)
    K = int(routing.topk)
    causal = bool(routing.causal)
    cu_q = routing.cu_seqlens_q.contiguous()
    cu_k = routing.cu_seqlens_k.contiguous()
    cu_chunks = routing.cu_chunks.contiguous()
    sel = routing.selection.contiguous()
    B = cu_q.shape[0] - 1
    nbound = routing.num_chunks_bound
    nseg = nbound * H
    bm, bn, nt, st = tiles(D)
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    scale_log2 = scale * 1.4426950408889634

    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(H, total_q, dtype=torch.float32, device=dev)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (H, total_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    if total_q == 0 or H == 0:
        return out, lse

    s0 = 1 if causal else 0
    npass = K - s0
    rows_tot = total_q * H
    _i32(rows_tot * max(K, 1), "total_q*H*topk")
    _i32(max(npass, 1) * nseg + 1, "passes*num_chunks_bound*H")
    _i32(total_k * Hk, "total_k*Hk")
    arch = common.device_arch(dev)
    ks = _kernels(q.dtype, D, causal, arch)
    dt_name = _DTYPES[q.dtype]
    stream = common.current_stream()

    i32 = torch.int32
    dummy = torch.zeros(4, dtype=i32, device=dev)
    if K > 1:
        oacc = torch.empty(total_q, H, D, dtype=torch.float32, device=dev)
        mst = torch.empty(rows_tot, dtype=torch.float32, device=dev)
        lst = torch.empty(rows_tot, dtype=torch.float32, device=dev)
    else:
        oacc = torch.empty(4, dtype=torch.float32, device=dev)
        mst = lst = oacc

    nused, seg_off, tile_off, tile_seg, pass_tiles, rows_list, bound_pass = _slot_index(
        ks, sel, cu_q, cu_chunks, out, lse, B, total_q, H, K, nseg, causal, bm, dt_name, D, stream, dev)

    common_ptrs = (_p(q), _p(k), _p(v), _p(out), _p(lse, 4), _p(oacc), _p(mst, 4), _p(lst, 4), _p(nused, 4),
                   _p(cu_q, 4), _p(cu_k, 4), _p(cu_chunks, 4))
    if causal:
        lens = (cu_q[1:] - cu_q[:-1]).clamp(min=0)
        cu_mt = torch.zeros(B + 1, dtype=i32, device=dev)
        torch.cumsum((lens + (bm - 1)) // bm, 0, dtype=i32, out=cu_mt[1:])
        mt_bound = (total_q + B * (bm - 1)) // bm
        key = ("moba_fwd_sm80", dt_name, D, True, True, bm, bn, nt, st)
        ks[key](*common_ptrs, _p(cu_mt, 4), _p(dummy, 4), _p(dummy, 4), _p(dummy, 4), _p(dummy, 4),
                B, total_q, total_k, H, Hk, C, nseg, 0, 0, mt_bound, scale_log2, stream)
    for sp in range(npass):
        first = (not causal) and sp == 0
        key = ("moba_fwd_sm80", dt_name, D, False, first, bm, bn, nt, st)
        ks[key](*common_ptrs, _p(pass_tiles[sp:], 4), _p(rows_list, 4), _p(tile_seg, 4), _p(seg_off, 4),
                _p(tile_off, 4), B, total_q, total_k, H, Hk, C, nseg, sp + s0, sp, bound_pass, scale_log2, stream)
    return out, lse


def _rowsum_delta(out, dout, dlse):
    """``delta = rowsum(dO * O) - dlse`` in fp32, layout (total_q, H); row slices bound the fp32
    temporaries to ~2 * 2^26 * 4 bytes whatever the size (no host sync)."""
    total_q, H, D = out.shape
    delta = torch.empty(total_q, H, dtype=torch.float32, device=out.device)
    step = max(1, (1 << 26) // max(H * D, 1))
    for r0 in range(0, total_q, step):
        r1 = min(total_q, r0 + step)
        torch.sum(dout[r0:r1].float() * out[r0:r1].float(), dim=-1, out=delta[r0:r1])
    if dlse is not None:
        delta -= dlse.t()
    return delta


def attention_backward_cute(q, k, v, out, lse, dout, dlse, routing, softmax_scale, deterministic, *, dq=None,
                            dk=None, dv=None):
    """MoBA backward with the CuTe kernels: ``(dq, dk, dv)`` in the input dtype.

    ``dlse`` (H, total_q) or None: the gradient reaching the LSE output. Always bitwise
    deterministic (dK/dV key-major with register accumulation, dQ by slot passes without
    atomics), whatever ``deterministic`` says. ``dq``/``dk``/``dv`` may be given (contiguous,
    right shape and dtype): tests pass NaN-filled buffers. Extra memory: docs/design.md."""
    del deterministic
    q = q if q.is_contiguous() else q.contiguous()
    k = k if k.is_contiguous() else k.contiguous()
    v = v if v.is_contiguous() else v.contiguous()
    out = out if out.is_contiguous() else out.contiguous()
    dout = dout.contiguous()
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.float()
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    dev = q.device
    if dq is None:
        dq = torch.empty_like(q)
    if dk is None:
        dk = torch.empty_like(k)
    if dv is None:
        dv = torch.empty_like(v)
    C = int(routing.chunk_size)
    K = int(routing.topk)
    causal = bool(routing.causal)
    if total_q == 0 or H == 0 or total_k == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    cu_q = routing.cu_seqlens_q.contiguous()
    cu_k = routing.cu_seqlens_k.contiguous()
    cu_chunks = routing.cu_chunks.contiguous()
    sel = routing.selection.contiguous()
    offsets = routing.offsets.contiguous()
    query_rows = routing.query_rows.contiguous()
    B = cu_q.shape[0] - 1
    nbound = routing.num_chunks_bound
    nseg = nbound * H
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    scale_log2 = scale * 1.4426950408889634
    s0 = 1 if causal else 0
    npass = K - s0
    rows_tot = total_q * H
    _i32(rows_tot * max(K, 1), "total_q*H*topk")
    _i32(max(npass, 1) * nseg + 1, "passes*num_chunks_bound*H")
    _i32(total_k * Hk, "total_k*Hk")
    arch = common.device_arch(dev)
    dt_name = _DTYPES[q.dtype]
    specs = bwd_kernel_specs(dt_name, D, causal)
    ks = {sp[0]: _compiled(sp[0], sp[1], sp[2], arch) for sp in specs}
    stream = common.current_stream()
    i32 = torch.int32

    delta = _rowsum_delta(out, dout, dlse)

    # ---- dK, dV: key-major, one CTA per (chunk, KV head, key tile)
    kbm, kbn, knt = cfg.BWD_DKV_TILES[D]
    tpc = (C + kbn - 1) // kbn
    grid_x = _i32(nbound * tpc, "dK/dV grid")
    if grid_x > 0:
        ks[("moba_bwd_dkv_sm80", dt_name, D, causal, kbm, kbn, knt)](
            _p(q), _p(k), _p(v), _p(dout), _p(lse, 4), _p(delta, 4), _p(dk), _p(dv), _p(cu_q, 4), _p(cu_k, 4),
            _p(cu_chunks, 4), _p(offsets, 4), _p(query_rows, 4), B, total_q, total_k, H, Hk, C, tpc, grid_x,
            scale, scale_log2, stream)

    # ---- dQ: slot passes over an fp32 accumulator
    qbm, qbn, qnt = cfg.BWD_DQ_TILES[D]
    dq_acc = torch.zeros(total_q, H, D, dtype=torch.float32, device=dev)
    _, seg_off, tile_off, tile_seg, pass_tiles, rows_list, bound_pass = _slot_index(
        ks, sel, cu_q, cu_chunks, out, lse, B, total_q, H, K, nseg, causal, qbm, dt_name, D, stream, dev)
    dummy = torch.zeros(4, dtype=i32, device=dev)
    ptrs = (_p(q), _p(k), _p(v), _p(dout), _p(lse, 4), _p(delta, 4), _p(dq_acc), _p(cu_q, 4), _p(cu_k, 4),
            _p(cu_chunks, 4))
    if causal:
        lens = (cu_q[1:] - cu_q[:-1]).clamp(min=0)
        cu_mt = torch.zeros(B + 1, dtype=i32, device=dev)
        torch.cumsum((lens + (qbm - 1)) // qbm, 0, dtype=i32, out=cu_mt[1:])
        mt_bound = (total_q + B * (qbm - 1)) // qbm
        ks[("moba_bwd_dq_sm80", dt_name, D, True, qbm, qbn, qnt)](
            *ptrs, _p(cu_mt, 4), _p(dummy, 4), _p(dummy, 4), _p(dummy, 4), _p(dummy, 4),
            B, total_q, total_k, H, Hk, C, nseg, 0, mt_bound, scale, scale_log2, stream)
    key = ("moba_bwd_dq_sm80", dt_name, D, False, qbm, qbn, qnt)
    for sp in range(npass):
        ks[key](*ptrs, _p(pass_tiles[sp:], 4), _p(rows_list, 4), _p(tile_seg, 4), _p(seg_off, 4),
                _p(tile_off, 4), B, total_q, total_k, H, Hk, C, nseg, sp, bound_pass, scale, scale_log2, stream)
    dq.copy_(dq_acc)
    return dq, dk, dv


# --- timing (GPU machine): python -m moba_cute.kernels.attention_launch --bench ------------

def _median_ms(fn, iters=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _bench_one(S, B=2, H=16, Hk=16, D=128, C=128, K=8, dtype=torch.bfloat16, check=False):
    from .. import reference

    dev = "cuda"
    rec = dict(suite="flashmoba", impl="moba_cute.sm80", B=B, H=H, Hk=Hk, D=D, C=C, K=K, S=S, dtype=str(dtype),
               causal=True, device=torch.cuda.get_device_name())
    q = torch.randn(B * S, H, D, device=dev, dtype=dtype)
    k = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    v = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
    route = None
    try:
        from .route_launch import route_cute

        def route():
            return route_cute(q, k, cu, cu, S, S, C, K, True)
        r = route()
        rec["routing"] = "route_cute"
    except Exception as e:  # noqa: BLE001
        rec["routing"] = f"reference ({type(e).__name__}: {str(e)[:120]})"
        route = None
        r = reference.route(q, k, cu, cu, S, S, C, K, True)
    torch.cuda.synchronize()
    rec["attn_ms"] = _median_ms(lambda: attention_cute(q, k, v, r, None, False))
    if route is not None:
        rec["routing_ms"] = _median_ms(route)
        rec["fwd_ms"] = _median_ms(lambda: attention_cute(q, k, v, route(), None, False))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention_cute(q, k, v, r, None, False)
    torch.cuda.synchronize()
    rec["attn_extra_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    pairs = B * H * S * (K - 1) * C + B * H * S * (C + 1) / 2  # approx attended (q, k) pairs
    rec["eff_tflops_attn"] = 4 * D * pairs / (rec["attn_ms"] * 1e-3) / 1e12
    if check:
        out, lse = attention_cute(q, k, v, r, None, False)
        o32, l32 = reference.attention(q, k, v, r)
        olp, _ = reference.attention(q, k, v, r, compute_dtype=dtype)
        rec["check_err"] = (out.float() - o32).abs().max().item()
        rec["check_ref_lowp_err"] = (olp.float() - o32).abs().max().item()
    # ---- backward and forward + backward (routing included)
    dout = torch.randn_like(q)
    out, lse = attention_cute(q, k, v, r, None, False)
    rec["bwd_ms"] = _median_ms(lambda: attention_backward_cute(q, k, v, out, lse, dout, None, r, None, False))
    del out, lse

    def fwdbwd():
        rr = route() if route is not None else r
        o, l = attention_cute(q, k, v, rr, None, False)
        attention_backward_cute(q, k, v, o, l, dout, None, rr, None, False)

    rec["fwdbwd_ms"] = _median_ms(fwdbwd)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    rec["fwdbwd_extra_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    rec["eff_tflops_fwdbwd"] = 3.5 * 4 * D * pairs / (rec["fwdbwd_ms"] * 1e-3) / 1e12
    del r
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qq, kk, vv = (t.view(B, S, -1, D).transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
        do4 = dout.view(B, S, -1, D).transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with torch.no_grad():
                rec["fa2_fwd_ms"] = _median_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True))

            def fa2_fb():
                o4 = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                torch.autograd.grad(o4, (qq, kk, vv), do4)

            rec["fa2_fwdbwd_ms"] = _median_ms(fa2_fb)
        rec["speedup_fwdbwd_vs_fa2"] = rec["fa2_fwdbwd_ms"] / rec["fwdbwd_ms"]
    except Exception as e:  # noqa: BLE001
        rec["fa2_fwd_ms"] = rec.get("fa2_fwd_ms")
        rec["fa2_note"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sizes", default="8192,32768,65536")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return
    recs = []
    for i, S in enumerate(int(x) for x in args.sizes.split(",")):
        try:
            rec = _bench_one(S, check=(i == 0))
        except Exception as e:  # noqa: BLE001
            rec = dict(S=S, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(rec), flush=True)
        recs.append(rec)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
