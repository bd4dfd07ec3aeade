"""PyTorch FlexAttention with a MoBA mask (impl ``flex_moba``).

The MoBA selection comes from ``moba_cute.route`` (the CuTe routing kernel where there is one,
else the reference) and is expanded into a per-token table of selected chunks:

* uniform batches: ``table[b, h, q, j]`` (B, H, S, n_chunks + 1) bool, and
  ``mask_mod(b, h, q, kv) = (kv <= q) & table[b, h, q, kv // C]``;
* varlen batches (packed into one sequence of B=1): ``table[h, q, g]`` (H, total, n_global + 1)
  over global chunk ids, with ``chunk_of[kv]`` the global chunk of key kv, and
  ``mask_mod = (kv <= q) & table[h, q, chunk_of[kv]]`` (a selected chunk always belongs to
  the query's own sequence, so sequences never mix).

The last column of the table is a dump slot for unused (-1) selection entries. Where the bool
table would hold 2^31 elements or more (flashmoba at 128K and beyond), Inductor's int32 index
arithmetic overflows, so the table is bit-packed instead: ``bits[..., w]`` (int64) holds chunks
64w..64w+63 and ``mask_mod = (kv <= q) & ((bits[b, h, q, c // 64] >> (c % 64)) & 1)`` with
c the key's chunk (64x less memory; used only where the bool table cannot be). The BlockMask is
built by ``create_block_mask`` (compiled) from that mask_mod, and ``flex_attention`` (compiled)
runs with it. Timed separately: routing, mask build (table fill + create_block_mask), flex
forward, flex forward+backward; the record's routing/fwd/fwdbwd figures are their sums.
Sizes where the table does not fit in (half of the free) GPU memory are skipped.
"""

from __future__ import annotations

import torch

from .common import Inputs, Runner, Unsupported, grad_fn

__all__ = [
    "token_table_uniform",
    "token_table_packed",
    "table_bytes",
    "table_format",
    "uniform_mask_mod",
    "packed_mask_mod",
    "packed_chunk_of",
    "flex_runner",
]

BLOCK = 128
_compiled = {}


def _num_chunks(lens, C: int) -> list[int]:
    return [(int(n) + C - 1) // C for n in lens]


WORD = 64
INT32_MAX = 2**31 - 1


def _table_rows_and_chunks(cfg) -> tuple[int, int]:
    lens = cfg.lengths()
    if cfg.varlen:
        return cfg.H * sum(lens), sum(_num_chunks(lens, cfg.C))
    return cfg.B * cfg.H * cfg.S, _num_chunks([cfg.S], cfg.C)[0]


def table_format(cfg) -> str:
    """"bool" (one byte per chunk) where its element count fits int32 indexing, else "bits"."""
    rows, n = _table_rows_and_chunks(cfg)
    return "bool" if rows * (n + 1) <= INT32_MAX else "bits"


def table_bytes(cfg, fmt: str | None = None) -> int:
    """Bytes of the per-token selection table of ``cfg`` in format ``fmt`` (default: chosen)."""
    rows, n = _table_rows_and_chunks(cfg)
    fmt = fmt or table_format(cfg)
    return rows * (n + 1) if fmt == "bool" else rows * (-(-n // WORD) + 1) * 8


def _scatter(out, dim, idx, valid, dump, fmt):
    """Mark chunk ids ``idx`` (where ``valid``) in ``out`` along ``dim``; invalid -> ``dump``."""
    if fmt == "bool":
        out.scatter_(dim, torch.where(valid, idx, dump), True)
    else:
        word = torch.where(valid, torch.div(idx, WORD, rounding_mode="floor"), dump)
        bit = torch.where(valid, torch.ones_like(idx) << torch.remainder(idx, WORD), torch.zeros_like(idx))
        out.scatter_add_(dim, word, bit)  # distinct bits per row: the sum is the OR
    return out


def _alloc(shape_lead, n, fmt, device, out):
    width = n + 1 if fmt == "bool" else -(-n // WORD) + 1
    if out is None:
        return torch.zeros(*shape_lead, width, dtype=torch.bool if fmt == "bool" else torch.int64, device=device)
    out.zero_()
    return out


def _has(table, fmt, *idx_then_chunk):
    *lead, c = idx_then_chunk
    if fmt == "bool":
        return table[(*lead, c)]
    word = table[(*lead, c // WORD)]
    return ((word >> (c % WORD)) & 1) != 0


def token_table_uniform(selection: torch.Tensor, B: int, S: int, n_chunks: int, out: torch.Tensor | None = None,
                        fmt: str = "bool"):
    """(B*S, H, K) local chunk ids (-1 unused) -> (B, H, S, n_chunks + 1) bool table
    (fmt "bits": (B, H, S, ceil(n_chunks / 64) + 1) int64 bit words)."""
    H, K = selection.shape[1], selection.shape[2]
    idx = selection.view(B, S, H, K).permute(0, 2, 1, 3).to(torch.int64)
    out = _alloc((B, H, S), n_chunks, fmt, selection.device, out)
    return _scatter(out, 3, idx, idx >= 0, out.shape[3] - 1, fmt)


def _cu_chunks(cu_seqlens: torch.Tensor, C: int) -> torch.Tensor:
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    n = (lens + C - 1) // C
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int64, device=cu_seqlens.device)
    out[1:] = torch.cumsum(n, 0)
    return out


def packed_chunk_of(cu_seqlens: torch.Tensor, C: int) -> torch.Tensor:
    """Global chunk id of every key of a packed batch (int32, (total,))."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    total = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)
    t = torch.arange(total, device=cu.device)
    return (_cu_chunks(cu_seqlens, C)[seq] + torch.div(t - cu[seq], C, rounding_mode="floor")).to(torch.int32)


def token_table_packed(selection: torch.Tensor, cu_seqlens: torch.Tensor, C: int, n_global: int,
                       out: torch.Tensor | None = None, fmt: str = "bool"):
    """(total, H, K) local chunk ids -> (H, total, n_global + 1) bool table of global chunks
    (fmt "bits": (H, total, ceil(n_global / 64) + 1) int64 bit words)."""
    total, H, K = selection.shape
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)
    base = _cu_chunks(cu_seqlens, C)[seq].view(total, 1, 1)
    sel = selection.to(torch.int64)
    valid = (sel >= 0).permute(1, 0, 2)
    g = (sel + base).permute(1, 0, 2)
    out = _alloc((H, total), n_global, fmt, selection.device, out)
    return _scatter(out, 2, g, valid, out.shape[2] - 1, fmt)


def uniform_mask_mod(table: torch.Tensor, C: int, fmt: str = "bool"):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & _has(table, fmt, b, h, q_idx, kv_idx // C)

    return mask_mod


def packed_mask_mod(table: torch.Tensor, chunk_of: torch.Tensor, fmt: str = "bool"):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & _has(table, fmt, h, q_idx, chunk_of[kv_idx])

    return mask_mod


def _compiled_fns():
    if not _compiled:
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        # dynamic=False: one specialized compile per shape. The first H200 run used the default
        # (automatic dynamic shapes after the first size) and flex looked slower than its scaling
        # suggests at 16K-64K (e.g. attention 3.2 ms at 8K, 21.9 ms at 16K); per-shape kernels
        # remove that doubt at the price of a compile per size. Not yet re-measured on a GPU.
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
        _compiled["cbm"] = torch.compile(create_block_mask, dynamic=False)
    return _compiled["flex"], _compiled["cbm"]


def flex_runner(inp: Inputs, route_fn, route_desc: str, mem_fraction: float = 0.5) -> Runner:
    """``route_fn()`` returns a fresh (total, H, K) selection (it is timed as the routing)."""
    if inp.device.type != "cuda":
        raise Unsupported("flex_moba runs on CUDA only")
    if not inp.cfg.causal:
        raise Unsupported("flex_moba benchmark covers causal configs only")
    cfg = inp.cfg
    fmt = table_format(cfg)
    need = table_bytes(cfg, fmt)
    free, _ = torch.cuda.mem_get_info()
    if need > mem_fraction * free:
        raise Unsupported(f"mask table of {need / 1e9:.1f} GB does not fit ({free / 1e9:.1f} GB free)")
    flex, cbm = _compiled_fns()
    H, Hk, D, C = cfg.H, cfg.Hk, cfg.D, cfg.C
    q, k, v = inp.q, inp.k, inp.v
    dev = q.device
    sel0 = route_fn()
    if cfg.varlen:
        total = cfg.total_tokens
        n_global = sum(_num_chunks(cfg.lengths(), C))
        chunk_of = packed_chunk_of(inp.cu_seqlens, C)
        table = token_table_packed(sel0, inp.cu_seqlens, C, n_global, fmt=fmt)
        mask_mod = packed_mask_mod(table, chunk_of, fmt)
        Bm, L = 1, total

        def fill(sel):
            token_table_packed(sel, inp.cu_seqlens, C, n_global, out=table, fmt=fmt)
    else:
        Bm, L = cfg.B, cfg.S
        n = _num_chunks([L], C)[0]
        table = token_table_uniform(sel0, Bm, L, n, fmt=fmt)
        mask_mod = uniform_mask_mod(table, C, fmt)

        def fill(sel):
            token_table_uniform(sel, Bm, L, n, out=table, fmt=fmt)

    def build(sel):
        fill(sel)
        return cbm(mask_mod, Bm, H, L, L, device=dev, BLOCK_SIZE=BLOCK)

    state = {"bm": build(sel0)}
    try:  # share of (q-block, kv-block) tiles the BlockMask skips: explains flex's speed
        skipped = float(state["bm"].sparsity())
    except Exception:  # noqa: BLE001 - informative only
        skipped = None

    def bhsd(t):
        return t.view(Bm, L, t.shape[1], D).transpose(1, 2)

    gqa = H != Hk

    def attn(bm):
        out = flex(bhsd(q), bhsd(k), bhsd(v), block_mask=bm, enable_gqa=gqa)
        return out

    def dout_of(out):
        return bhsd(inp.dout)

    def mask_part():
        state["bm"] = build(sel0)

    def attn_fwd():
        return attn(state["bm"])

    attn_fwdbwd = grad_fn(attn_fwd, (q, k, v), dout_of)

    def end_to_end():
        bm = build(route_fn())
        return torch.autograd.grad(attn(bm), (q, k, v), dout_of(None))

    r = Runner("flex_moba")
    r.route = route_fn
    r.parts = {"mask_ms": mask_part, "attn_fwd_ms": attn_fwd, "attn_fwdbwd_ms": attn_fwdbwd}
    r.peak = end_to_end

    def combine(f):
        rt, mk = f.get("routing_ms"), f.get("mask_ms")
        routing = rt + mk if rt is not None and mk is not None else None
        out = {"routing_ms": routing}
        for key, part in (("fwd_ms", "attn_fwd_ms"), ("fwdbwd_ms", "attn_fwdbwd_ms")):
            p = f.get(part)
            out[key] = routing + p if routing is not None and p is not None else None
        return out

    r.combine = combine
    if skipped is not None:
        nb = -(-(cfg.max_seqlen if not cfg.varlen else cfg.total_tokens) // BLOCK)
        causal_skip = 100.0 * (1 - (nb * (nb + 1) / 2) / (nb * nb))
        r.notes.append(f"BlockMask skips {skipped:.1f}% of the {BLOCK}x{BLOCK} tiles (dense causal: {causal_skip:.1f}%; "
                       "a tile is kept when any of its 128 queries selected its chunk)")
    if fmt == "bits":
        r.notes.append("selection table bit-packed (the bool table would overflow int32 indexing)")
    r.notes.append(
        f"routing by moba_cute.route ({route_desc}); routing_ms = route + mask build (table fill + "
        "create_block_mask, also in mask_ms); fwd/fwdbwd = routing + flex attention (attn_*_ms), sums of "
        "separately timed medians"
    )

    def cleanup():
        state.clear()
        nonlocal table, mask_mod, sel0
        table = mask_mod = sel0 = None

    r.cleanup = cleanup
    return r
