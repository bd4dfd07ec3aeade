"""The routing object: which key chunks every query attends to, in two layouts.

Every routing path (the PyTorch reference and the CuTe kernels) produces a :class:`Routing`
with exactly this layout, so attention kernels and users can consume either.

Chunks are numbered globally across the packed batch: sequence ``b`` owns the global chunks
``cu_chunks[b] .. cu_chunks[b+1]-1``, and local chunk ``j`` of sequence ``b`` is global chunk
``cu_chunks[b] + j``. The number of chunks of a sequence is ``ceil(Sk_b / chunk_size)``.

Since shapes must not depend on data (no host synchronization), every buffer is sized by a
worst-case bound that the host knows from shapes alone:

* ``num_chunks_bound = (total_k + B * (chunk_size - 1)) // chunk_size``
  (``>= sum_b ceil(Sk_b / C)``); global chunks past ``cu_chunks[B]`` are never used and
  have count 0.
* ``capacity = total_q * H * topk``: the key-major row list can hold every selection.

Query-major layout
    ``selection``: int32 ``(total_q, H, topk)``. Entry ``[i, h, s]`` is the *local* chunk
    index (within the query's own sequence) of slot ``s``, or ``-1`` for an unused slot. Used
    slots come first. Causal: slot 0 is the query's own chunk, the other slots hold the chosen
    past chunks by descending score (ties: larger chunk index first). Non-causal: by
    descending score. A row with no key position (``p < 0``) is all ``-1``.

Key-major layout (what the attention kernels iterate over)
    Segments are indexed by ``seg = g * H + h`` for global chunk ``g`` and query head ``h``
    (the query heads of one KV head group are adjacent, so a kernel handling one KV chunk
    finds all its query heads in one contiguous range of segments).

    ``offsets``: int32 ``(num_chunks_bound * H + 1,)``, exclusive prefix sum of the segment
    counts; ``offsets[0] == 0``. Segment ``seg`` owns
    ``query_rows[offsets[seg] : offsets[seg + 1]]``.
    ``query_rows``: int32 ``(capacity,)``: the *global* query row indices (into ``total_q``)
    that selected the segment's chunk for that head, ascending within a segment. Entries past
    ``offsets[-1]`` are ``-1``.

The key-major index is exactly the transpose of the query-major selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Routing", "num_chunks_bound", "chunk_offsets"]


def num_chunks_bound(total_k: int, batch: int, chunk_size: int) -> int:
    """Host-side upper bound on the number of chunks of a packed batch (no data needed)."""
    return (total_k + batch * (chunk_size - 1)) // chunk_size


def chunk_offsets(cu_seqlens_k: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``cu_chunks`` (int32, ``(B+1,)``) from ``cu_seqlens_k``, computed on its device."""
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
    n = (lens + (chunk_size - 1)) // chunk_size
    out = torch.zeros(cu_seqlens_k.shape[0], dtype=torch.int32, device=cu_seqlens_k.device)
    out[1:] = torch.cumsum(n, 0).to(torch.int32)
    return out


@dataclass(frozen=True)
class Routing:
    """A MoBA routing decision for a packed batch (see the module docstring for the layout).

    Returned by :func:`moba_cute.route`; pass it to :func:`moba_cute.attention_with_routing`
    to reuse or inspect a selection. It also records the batch it was made for, so that the
    attention call can check it is given matching inputs.
    """

    selection: torch.Tensor  # (total_q, H, topk) int32, local chunk ids, -1 = unused
    offsets: torch.Tensor  # (num_chunks_bound * H + 1,) int32
    query_rows: torch.Tensor  # (total_q * H * topk,) int32, -1 past offsets[-1]
    cu_chunks: torch.Tensor  # (B + 1,) int32
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor  # (B + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int
    chunk_size: int
    topk: int
    causal: bool
    num_kv_heads: int

    @property
    def num_heads(self) -> int:
        return self.selection.shape[1]

    @property
    def total_q(self) -> int:
        return self.selection.shape[0]

    @property
    def num_chunks_bound(self) -> int:
        return (self.offsets.shape[0] - 1) // self.num_heads

    @property
    def counts(self) -> torch.Tensor:
        """Number of query rows per (global chunk, head): int32 ``(num_chunks_bound, H)``."""
        return (self.offsets[1:] - self.offsets[:-1]).view(self.num_chunks_bound, self.num_heads)

    def segment(self, global_chunk: int, head: int) -> torch.Tensor:
        """The ascending query rows that selected ``global_chunk`` for ``head`` (synchronizes)."""
        seg = global_chunk * self.num_heads + head
        lo, hi = (int(x) for x in self.offsets[seg : seg + 2].tolist())
        return self.query_rows[lo:hi]
