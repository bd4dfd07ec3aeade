"""Pure PyTorch MoBA: the whole contract of SPEC section 1 for any device and dtype.

This is the semantic ground truth the kernels are tested against and the path the public API
takes where no kernel applies (CPU tensors, unsupported configurations). It never builds a
(Sq x Sk) matrix: queries are processed in blocks of rows, and within a block, for every
(head, chunk), the rows that chose the chunk attend to its keys in one matrix product; the
partial results are merged by log-sum-exp. Work is linear in the number of attended pairs and
memory is bounded by the block size. When gradients are needed each block runs under
activation checkpointing, so the backward recomputes one block at a time.

The reference synchronizes the host (it loops over sequences); the kernels do not.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .routing import Routing, chunk_offsets, num_chunks_bound

__all__ = ["centroids", "route", "attention", "compute_dtype_for"]

# Query rows per attention block: bounds the working set (partials of rows * topk * D per head).
_BLOCK_ROWS = 8192


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: the precision the reference computes in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seqlens(cu: torch.Tensor) -> list[int]:
    return [int(x) for x in cu.tolist()]


def centroids(k: torch.Tensor, cu_seqlens_k: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk means per KV head, ``(num_chunks_bound, Hk, D)`` in fp32 (fp64 for fp64 input).

    Global chunk numbering of :mod:`moba_cute.routing`; rows past the last real chunk are 0.
    Each mean is over the chunk's real tokens (a partial last chunk divides by its length).
    """
    cu = _seqlens(cu_seqlens_k)
    batch = len(cu) - 1
    _, hk, d = k.shape
    acc = compute_dtype_for(k.dtype)
    out = torch.zeros(num_chunks_bound(k.shape[0], batch, chunk_size), hk, d, dtype=acc, device=k.device)
    g = 0
    for b in range(batch):
        kb = k[cu[b] : cu[b + 1]].to(acc)
        sk = kb.shape[0]
        nc = -(-sk // chunk_size)
        if nc == 0:
            continue
        pad = nc * chunk_size - sk
        if pad:
            kb = torch.cat([kb, kb.new_zeros(pad, hk, d)])
        sums = kb.view(nc, chunk_size, hk, d).sum(1)
        lens = torch.full((nc,), chunk_size, dtype=acc, device=k.device)
        lens[-1] = sk - (nc - 1) * chunk_size
        out[g : g + nc] = sums / lens.view(nc, 1, 1)
        g += nc
    return out


def _select(scores: torch.Tensor, pos: torch.Tensor, nc: int, chunk_size: int, topk: int, causal: bool):
    """Selection for one block of queries of one sequence.

    scores: (rows, H, nc) chunk scores; pos: (rows,) key positions p of the queries.
    Returns (rows, H, topk) int64 local chunk ids, -1 for unused slots.
    """
    rows, heads, _ = scores.shape
    dev = scores.device
    chunk_ids = torch.arange(nc, device=dev)
    # Sorting the chunks in reverse index order with a stable descending sort puts, among equal
    # scores, the larger chunk index first: the tie rule.
    rev = scores.flip(-1)
    if causal:
        own = torch.div(pos, chunk_size, rounding_mode="floor")  # (rows,)
        # a past chunk j competes iff j < own; in reversed order index r = nc-1-j
        competes = chunk_ids.view(1, nc) < own.view(rows, 1)  # (rows, nc) in chunk order
        competes = competes.flip(-1).view(rows, 1, nc).expand(rows, heads, nc)
        n_avail = own.clamp(min=0).clamp(max=nc)  # number of past chunks
        n_take = torch.clamp(n_avail, max=topk - 1)  # (rows,)
    else:
        competes = torch.ones(rows, heads, nc, dtype=torch.bool, device=dev)
        n_take = torch.full((rows,), min(topk, nc), dtype=torch.int64, device=dev)
    key = torch.where(competes, rev, torch.full_like(rev, -math.inf))
    # non-competing entries must sort after every competing one even if a score is -inf:
    # sort on (competes, score) by a two-pass stable sort.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, torch.sort(torch.gather(competes, -1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices)
    picked = (nc - 1) - order  # back to chunk ids, best first
    n_slots = topk - 1 if causal else topk
    picked = picked[..., :n_slots] if nc >= n_slots else torch.cat(
        [picked, picked.new_full((rows, heads, n_slots - nc), -1)], -1
    )
    slot = torch.arange(n_slots, device=dev).view(1, 1, n_slots)
    picked = torch.where(slot < n_take.view(rows, 1, 1), picked, torch.full_like(picked, -1))
    if causal:
        own_col = torch.where(pos >= 0, own, torch.full_like(own, -1)).view(rows, 1, 1).expand(rows, heads, 1)
        picked = torch.cat([own_col, picked], -1)
        picked = torch.where((pos >= 0).view(rows, 1, 1), picked, torch.full_like(picked, -1))
    return picked


def _key_major(selection: torch.Tensor, q_batch: torch.Tensor, cu_chunks: torch.Tensor, nbound: int):
    """Transpose a query-major selection into the key-major index of routing.py (no host sync)."""
    total_q, heads, topk = selection.shape
    dev = selection.device
    valid = selection >= 0
    g = cu_chunks.to(torch.int64)[q_batch].view(total_q, 1, 1) + selection.to(torch.int64)
    seg = g * heads + torch.arange(heads, device=dev).view(1, heads, 1)
    rows = torch.arange(total_q, device=dev).view(total_q, 1, 1).expand_as(seg)
    nseg = nbound * heads
    # invalid entries get the sentinel segment nseg so that they sort last
    seg = torch.where(valid, seg, torch.full_like(seg, nseg)).reshape(-1)
    sort_key = seg * max(total_q, 1) + rows.reshape(-1)
    sk, perm = torch.sort(sort_key)
    query_rows = rows.reshape(-1)[perm].to(torch.int32)
    query_rows = torch.where(seg[perm] < nseg, query_rows, torch.full_like(query_rows, -1))
    counts = torch.bincount(seg, minlength=nseg + 1)[:nseg]
    offsets = torch.zeros(nseg + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return offsets, query_rows


def _batch_index(cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """Sequence index of every packed query row."""
    rows = torch.arange(total_q, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    return (torch.searchsorted(cu_seqlens_q[1:].contiguous(), rows, right=True)).clamp(max=cu_seqlens_q.numel() - 2)


@torch.no_grad()
def route(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal=True) -> Routing:
    """MoBA routing (SPEC section 1, points 1-5) in PyTorch; returns a :class:`Routing`."""
    total_q, heads, d = q.shape
    hk = k.shape[1]
    group = heads // hk
    cq, ck = _seqlens(cu_seqlens_q), _seqlens(cu_seqlens_k)
    batch = len(cq) - 1
    acc = compute_dtype_for(q.dtype)
    cent = centroids(k, cu_seqlens_k, chunk_size)  # (nbound, hk, d)
    cu_chunks = chunk_offsets(cu_seqlens_k, chunk_size)
    cuc = _seqlens(cu_chunks)
    selection = torch.full((total_q, heads, topk), -1, dtype=torch.int32, device=q.device)
    for b in range(batch):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        nc = cuc[b + 1] - cuc[b]
        if sq == 0:
            continue
        if nc == 0:  # no keys: every row empty
            continue
        cb = cent[cuc[b] : cuc[b + 1]].repeat_interleave(group, dim=1)  # (nc, H, d)
        blk = max(1, (1 << 24) // max(1, heads * nc))
        for r0 in range(0, sq, blk):
            r1 = min(sq, r0 + blk)
            qb = q[cq[b] + r0 : cq[b] + r1].to(acc)
            scores = torch.einsum("rhd,chd->rhc", qb, cb)
            # a NaN score (NaN in q or in a chunk's keys) counts as +inf: it ranks first (ties
            # with +inf by chunk index, as always), so NaN reaches every row that can see it,
            # as in dense attention; the kernels rank the same way
            scores = torch.where(torch.isnan(scores), math.inf, scores)
            pos = torch.arange(r0, r1, device=q.device) + (sk - sq)
            selection[cq[b] + r0 : cq[b] + r1] = _select(scores, pos, nc, chunk_size, topk, causal).to(torch.int32)
    nbound = num_chunks_bound(k.shape[0], batch, chunk_size)
    offsets, query_rows = _key_major(selection, _batch_index(cu_seqlens_q, total_q), cu_chunks, nbound)
    return Routing(
        selection=selection,
        offsets=offsets,
        query_rows=query_rows,
        cu_chunks=cu_chunks,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k),
        chunk_size=int(chunk_size),
        topk=int(topk),
        causal=bool(causal),
        num_kv_heads=hk,
    )


def _zero_linked(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x that stay in x's autograd graph with zero gradient (no NaN from inf)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0)


def _attend_block(qb, kb, vb, sel, pos, sk, chunk_size, group, scale, causal):
    """Attention of one block of queries of one sequence, key-major.

    qb (rows, H, d); kb, vb (sk, Hk, d) of the sequence; sel (rows, H, topk) local chunk ids;
    pos (rows,) key positions. For every (head, chunk) the rows that chose the chunk are
    gathered and attend to the chunk's keys in one matrix product (keys are never copied per
    query); the per-chunk partial results are merged by log-sum-exp. Returns out (rows, H, d)
    and lse (rows, H) in qb's dtype; rows with nothing to attend give 0 and -inf.
    """
    rows, heads, d = qb.shape
    topk = sel.shape[-1]
    dev = qb.device
    nc = -(-sk // chunk_size)
    row_ids = torch.arange(rows, device=dev).repeat_interleave(topk)
    outs, lses = [], []
    for h in range(heads):
        ids = sel[:, h, :].reshape(-1).to(torch.int64)
        valid = ids >= 0
        chunks, order = torch.sort(ids[valid], stable=True)  # rows ascend within a chunk
        r_sorted = row_ids[valid][order]
        counts = torch.bincount(chunks, minlength=nc).tolist()
        kvh = h // group
        # split() rather than slicing in the loop: its backward is one concatenation, where a
        # slice's backward would materialize a zero tensor of the whole input per chunk
        q_parts = torch.split(torch.index_select(qb[:, h], 0, r_sorted), counts)
        r_parts = torch.split(r_sorted, counts)
        k_chunks = torch.split(kb[:, kvh], chunk_size)
        v_chunks = torch.split(vb[:, kvh], chunk_size)
        part_rows, part_lse, part_out = [], [], []
        for j, n in enumerate(counts):
            if n == 0:
                continue
            r = r_parts[j]
            s = (q_parts[j] @ k_chunks[j].T) * scale  # (n, c)
            if causal:
                t = torch.arange(j * chunk_size, j * chunk_size + k_chunks[j].shape[0], device=dev)
                s = s.masked_fill(t.view(1, -1) > pos[r].view(-1, 1), -math.inf)
            # detached stabilizer; every selected chunk holds >= 1 visible key (own chunk:
            # its first key; past chunks: all), so the partial sums are positive
            m = s.detach().amax(-1, keepdim=True)
            e = torch.exp(s - m)
            den = e.sum(-1, keepdim=True)
            part_rows.append(r)
            part_lse.append((m + torch.log(den)).squeeze(-1))
            part_out.append((e @ v_chunks[j]) / den)
        if part_rows:
            r = torch.cat(part_rows)
            plse = torch.cat(part_lse)
            pout = torch.cat(part_out)
            mx = torch.full((rows,), -math.inf, dtype=qb.dtype, device=dev)
            mx = mx.scatter_reduce(0, r, plse.detach(), reduce="amax")
            mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
            w = torch.exp(plse - mx[r])
            tot = torch.zeros(rows, dtype=qb.dtype, device=dev).index_add(0, r, w)
            acc = torch.zeros(rows, d, dtype=qb.dtype, device=dev).index_add(0, r, w.unsqueeze(-1) * pout)
        else:
            mx = torch.zeros(rows, dtype=qb.dtype, device=dev)
            tot = torch.zeros(rows, dtype=qb.dtype, device=dev)
            acc = torch.zeros(rows, d, dtype=qb.dtype, device=dev)
        # NaN totals (a NaN score or value) stay live: the row's output and LSE are NaN
        live = ~(tot <= 0)
        tot_safe = torch.where(live, tot, torch.ones_like(tot))
        # the where() keeps empty rows (out 0, lse -inf) in the graph with zero gradient
        out_h = torch.where(live.unsqueeze(-1), acc / tot_safe.unsqueeze(-1), _zero_linked(qb[:, h]))
        lse_h = torch.where(live, mx + torch.log(tot_safe), torch.full_like(tot, -math.inf))
        outs.append(out_h)
        lses.append(lse_h)
    return torch.stack(outs, 1), torch.stack(lses, 1)


def attention(q, k, v, routing: Routing, softmax_scale=None, compute_dtype=None):
    """MoBA attention (SPEC section 1, point 6) for a given routing.

    Returns ``out`` (total_q, H, D) in q's dtype and ``lse`` (H, total_q) fp32 (fp64 for fp64
    inputs). ``compute_dtype`` (default: fp32, or fp64 for fp64 input) is the precision of the
    whole computation; tests pass the input dtype to measure what plain low-precision PyTorch
    gets. Differentiable in q, k, v through autograd.
    """
    total_q, heads, d = q.shape
    hk = k.shape[1]
    group = heads // hk
    acc = compute_dtype or compute_dtype_for(q.dtype)
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    cq, ck = _seqlens(routing.cu_seqlens_q), _seqlens(routing.cu_seqlens_k)
    cs, topk, causal = routing.chunk_size, routing.topk, routing.causal
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    blk = _BLOCK_ROWS
    outs, lses = [], []
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        kb = k[ck[b] : ck[b + 1]].to(acc)
        vb = v[ck[b] : ck[b + 1]].to(acc)
        for r0 in range(0, sq, blk):
            r1 = min(sq, r0 + blk)
            qb = q[cq[b] + r0 : cq[b] + r1].to(acc)
            sel = routing.selection[cq[b] + r0 : cq[b] + r1]
            pos = torch.arange(r0, r1, device=q.device) + (sk - sq)
            if sk == 0:
                o = _zero_linked(qb)  # nothing to attend
                lse = qb.new_full((r1 - r0, heads), -math.inf)
            elif need_grad:
                o, lse = checkpoint(
                    _attend_block, qb, kb, vb, sel, pos, sk, cs, group, scale, causal, use_reentrant=False
                )
            else:
                o, lse = _attend_block(qb, kb, vb, sel, pos, sk, cs, group, scale, causal)
            outs.append(o)
            lses.append(lse)
    if outs:
        out = torch.cat(outs).to(q.dtype)
        lse = torch.cat(lses).to(lse_dtype).t().contiguous()
    else:  # no query rows (kept in q's graph, so a backward through it works)
        out = _zero_linked(q)
        lse = torch.zeros(heads, 0, dtype=lse_dtype, device=q.device)
    return out, lse
