"""Tile configurations of the sm90 (wgmma/TMA) MoBA forward segment kernel, per head dim.

``bn``: keys per n-block (one TMA box of K and one of V; a chunk of ``C <= bn`` keys is loaded
once per work unit); ``sub``: 64-row sub-tiles per work unit (one CTA walks up to ``64 * sub``
consecutive entries of one (chunk, head) segment); ``kv_stages``: K/V n-block buffers;
``consumers``: consumer warpgroups (1: two CTAs per SM; 2: one CTA per SM whose warpgroups take
alternate sub-tiles). Shared memory: ``consumers * 2 * 64 * D * 2`` (two Q stages per consumer
warpgroup) ``+ kv_stages * 2 * bn * D * 2`` bytes; the CTAs of one SM must fit in 227 KB.
Chosen on the H200 (docs/design.md, section 8). ``consumers=2`` measured slower there (64K
flashmoba segment kernel: 5.1 ms against 4.1 ms with one) and is not shipped.
"""

from __future__ import annotations

# head_dim -> (bn, sub, kv_stages, consumers)
FWD_TILES = {
    64: (128, 8, 1, 1),
    128: (128, 8, 1, 1),
}

# alternatives compiled in CI, run by the GPU tests and timed by the tuner (moba_cute.tune):
# smaller units (more CTAs for short sequences) and 64-key n-blocks with two K/V stages
ALT_TILES = {
    64: ((128, 4, 1, 1), (64, 8, 2, 1)),
    128: ((128, 4, 1, 1), (64, 8, 2, 1)),
}

SUPPORTED_HEAD_DIMS = tuple(sorted(FWD_TILES))

SMEM_PER_SM = 227 * 1024


def fwd_smem_bytes(head_dim: int, bn: int, kv_stages: int, consumers: int = 1) -> int:
    return consumers * 2 * 64 * head_dim * 2 + kv_stages * 2 * bn * head_dim * 2 + 1024 + 128


def ctas_per_sm(consumers: int) -> int:
    return 2 if consumers == 1 else 1


def unit_rows(head_dim: int) -> int:
    return 64 * FWD_TILES[head_dim][1]
