"""The kernel paths as PyTorch custom ops, so that torch.compile traces through them, and
the same paths for eager calls without the custom-op dispatch.

Each op has a fake (meta) implementation that only computes output shapes from input shapes:
every size is a host-known bound (see :mod:`moba_cute.routing`), so no op has a
data-dependent shape and none synchronizes the host. The real implementations launch the CuTe
kernels on the current stream (CUDA graph capture works once the kernels are compiled).

Eager calls (not under ``torch.compile``) skip the dispatcher: :func:`route_eager` calls the
routing kernels directly and :class:`AttentionFunction` is a plain ``autograd.Function`` over
the same forward and backward (a custom op with autograd costs ~90 us of host time per call
against ~15 us; docs/design.md, "Host path").
"""

from __future__ import annotations

from typing import Optional

import torch

from .routing import num_chunks_bound

__all__ = ["route_op", "attention_op", "attention_bwd_op"]


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


def routing_from_tensors(selection, offsets, query_rows, cu_chunks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, chunk_size, topk, causal, num_kv_heads):
    """A Routing from its tensors and static fields (the custom ops pass routings this way)."""
    from .routing import Routing

    return Routing(selection, offsets, query_rows, cu_chunks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, chunk_size, topk, causal, num_kv_heads)


@torch.library.custom_op("moba_cute::attention_fwd", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: torch.Tensor,
    offsets: torch.Tensor,
    query_rows: torch.Tensor,
    cu_chunks: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    chunk_size: int,
    topk: int,
    causal: bool,
    softmax_scale: Optional[float],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CuTe MoBA attention forward for a routing given by its tensors: (out, lse)."""
    from .kernels.attention_launch import attention_cute

    r = routing_from_tensors(selection, offsets, query_rows, cu_chunks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, chunk_size, topk, causal, k.shape[1])
    return attention_cute(q, k, v, r, softmax_scale, deterministic)


@attention_op.register_fake
def _attention_fake(q, k, v, selection, *rest):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("moba_cute::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: torch.Tensor,
    offsets: torch.Tensor,
    query_rows: torch.Tensor,
    cu_chunks: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    chunk_size: int,
    topk: int,
    causal: bool,
    softmax_scale: Optional[float],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CuTe MoBA attention backward: (dq, dk, dv)."""
    from .kernels.attention_launch import attention_backward_cute

    r = routing_from_tensors(selection, offsets, query_rows, cu_chunks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, chunk_size, topk, causal, k.shape[1])
    return attention_backward_cute(q, k, v, out, lse, dout, dlse, r, softmax_scale, deterministic)


@attention_bwd_op.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_ROUTING_ARGS = 13  # selection .. deterministic: the op arguments after q, k, v


def _attention_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *inputs[3:9])
    ctx.static = inputs[9:]
    # an unused output's gradient arrives as None instead of a zero-filled tensor (a PyTorch
    # fill kernel per backward when the caller does not use the LSE)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, *routing_tensors = ctx.saved_tensors
    if dout is None:  # only the LSE was used
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd_op(dout.contiguous(), dlse, q, k, v, out, lse, *routing_tensors, *ctx.static)
    return (dq, dk, dv) + (None,) * _ROUTING_ARGS


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def route_eager(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal):
    """:func:`route_op`'s kernels called directly: a :class:`~moba_cute.routing.Routing`."""
    from .kernels.route_launch import route_cute

    return route_cute(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal)


class AttentionFunction(torch.autograd.Function):
    """Eager twin of :func:`attention_op` with its autograd: ``apply(q, k, v, routing,
    softmax_scale, deterministic) -> (out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, routing, softmax_scale, deterministic):
        from .kernels.attention_launch import attention_cute

        # the per-slot index is kept for the backward (4 launches fewer there)
        out, lse, index = attention_cute(q, k, v, routing, softmax_scale, deterministic, keep_index=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.index = index
        ctx.routing = routing
        ctx.args = (softmax_scale, deterministic)
        ctx.set_materialize_grads(False)  # as in _attention_setup_context
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .kernels.attention_launch import attention_backward_cute

        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward_cute(q, k, v, out, lse, dout, dlse, ctx.routing, *ctx.args,
                                             index=ctx.index)
        ctx.index = None  # (a second backward, retain_graph=True, rebuilds it)
        return dq, dk, dv, None, None, None
