"""The kernel paths as PyTorch custom ops, so that torch.compile traces through them.

Each op has a fake (meta) implementation that only computes output shapes from input shapes:
every size is a host-known bound (see :mod:`moba_cute.routing`), so no op has a
data-dependent shape and none synchronizes the host. The real implementations launch the CuTe
kernels on the current stream (CUDA graph capture works once the kernels are compiled).
"""

from __future__ import annotations

import torch

from .routing import num_chunks_bound

__all__ = ["route_op"]


@torch.library.custom_op("moba_cute::route", mutates_args=())
def route_op(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    chunk_size: int,
    topk: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CuTe routing: returns (selection, offsets, query_rows, cu_chunks) of a Routing."""
    from .kernels.route_launch import route_cute

    r = route_cute(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal)
    return r.selection, r.offsets, r.query_rows, r.cu_chunks


@route_op.register_fake
def _route_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal):
    total_q, heads, _ = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    nb = num_chunks_bound(k.shape[0], batch, chunk_size)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (
        q.new_empty((total_q, heads, topk), dtype=torch.int32),
        torch.empty((nb * heads + 1,), **i32),
        torch.empty((total_q * heads * topk,), **i32),
        torch.empty((batch + 1,), **i32),
    )
