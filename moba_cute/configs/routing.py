"""Tile configurations of the routing kernels, per arch family and head dim.

``bm``: packed query rows (position x query head of one KV group) per CTA of the top-k
kernel; ``bn``: centroids per tile. 128 threads (4 warps as 2x2 over the bm x bn tile,
mma.sync m16n8k16). Shared memory of the top-k kernel:
``bm*(D+8)*2 + 4*bn*(D+8)*2 + bn*(bm+4)*4 + 128*list_cap*8`` bytes.
"""

from __future__ import annotations

# head_dim -> (bm, bn)
TOPK_TILES = {
    "sm90": {64: (64, 64), 96: (64, 64), 128: (64, 64), 192: (64, 32), 256: (64, 32)},
    "sm80": {64: (64, 64), 96: (64, 64), 128: (64, 64), 192: (64, 32), 256: (64, 32)},
}

# shared memory a CTA may use (bytes)
SMEM_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}

# static capacities of the running top-k lists (runtime list length <= capacity)
LIST_CAPS = (8, 16, 32, 64)

SUPPORTED_HEAD_DIMS = (64, 96, 128, 192, 256)


def list_cap(list_len: int) -> int:
    for c in LIST_CAPS:
        if list_len <= c:
            return c
    raise ValueError(f"top-k list length {list_len} > {LIST_CAPS[-1]}")


def topk_smem_bytes(head_dim: int, bm: int, bn: int, cap: int) -> int:
    dp = head_dim + 8
    return bm * dp * 2 + 4 * bn * dp * 2 + bn * (bm + 4) * 4 + 128 * cap * 8 + 1024
