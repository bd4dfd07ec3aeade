"""GPU: the decode-step kernels (kernels/decode.py) through the public API -- few queries per
sequence against longer caches, varlen and padded (strided, transformers' cache layout read in
place) -- against the fp32 reference (SPEC section 3 bound), bitwise deterministic, equal to the
general path up to rounding, and inside a CUDA graph."""

import random

import pytest
import torch

import moba_cute
from moba_cute import interface, reference
from helpers import make_batch
from test_attention_gpu import check_against_reference

pytestmark = pytest.mark.gpu

_rng = random.Random(5)
_MANY_K = [_rng.randint(1, 3000) for _ in range(40)]

CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([1], [4097], 8, 2, 128, 8, True),
    ([1, 1, 1, 1], [1, 17, 113, 1000], 4, 4, 64, 4, True),  # odd lengths
    ([3, 16], [113, 5000], 8, 1, 48, 5, True),  # several queries, GQA 8, uneven chunks
    ([4, 2], [2, 300], 4, 2, 16, 64, True),  # Sq > Sk: empty rows; topk above the chunk count
    ([1] * 40, _MANY_K, 8, 2, 32, 3, True),  # many sequences
    ([2, 1], [700, 129], 4, 2, 128, 1, True),  # own chunk only
    ([5, 1], [900, 40], 4, 4, 64, 3, False),  # non-causal
    ([1, 3], [0, 70], 2, 1, 16, 2, False),  # non-causal, a sequence without keys
    ([1, 1], [20000, 9000], 16, 4, 4096, 3, True),  # large chunks: key splits + merge
    ([1], [3000], 4, 4, 3008, 1, True),  # one chunk over the whole cache (a dense layer)
    ([16], [16], 4, 2, 16, 2, True),  # a short prefill (Sq = Sk) also takes the path
    ([1], [40000], 8, 2, 16, 4, True),  # 2500 chunks: over the grouped kernel's 2048, per-head kernel
    ([2, 1], [33000, 5000], 32, 4, 4096, 12, True),  # GQA 8, every chunk selected: head groups
    ([1], [70000], 8, 8, 4096, 12, False),  # no GQA, non-causal, large chunks
    ([2, 3], [50, 1000], 8, 2, 64, 16, False),  # non-causal, topk covers every chunk
    # chunks of 1024+ keys: the group kernel over the union of the heads' selections
    ([3, 1], [9000, 5000], 12, 4, 1024, 4, True),  # 3 heads per CTA, several queries
    ([1, 2], [6000, 3000], 8, 4, 1024, 2, False),  # 2 heads per CTA, non-causal
    ([2], [2000], 8, 2, 1024, 1, True),  # own chunk only
    ([1, 1], [7000, 2100], 8, 2, 1030, 3, True),  # chunks not a multiple of the key tile
    ([1, 2], [5000, 3000], 32, 2, 1024, 3, True),  # 16 heads per CTA (tensor cores: the whole m16 tile)
    ([2, 1], [3000, 700], 16, 2, 4096, 2, False),  # 8 heads per CTA, every chunk, non-causal
    # splits sized by the longest row, each row's work dealt out evenly: the short row leaves
    # splits with little or nothing to do (33 splits each: the short row has 2 tiles of 16 keys
    # with every chunk; with selection one chunk, 94 tiles)
    ([1, 1], [40000, 20], 8, 2, 40000, 1, True),
    ([1, 1], [131072, 1500], 8, 2, 4096, 12, True),
]


def _plans():
    from moba_cute.kernels import decode_launch

    return decode_launch.DECODE_PLANS


def _compare(o, l, q, k, v, cq, ck, mq, mk, C, K, causal, scale, dtype):
    """SPEC section 3 bound against the reference with the reference's routing."""
    r = reference.route(q, k, cq, ck, mq, mk, C, K, causal)
    check_against_reference(o, l, q, k, v, r, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_varlen(case, D, dtype):
    lq, lk, H, Hk, C, K, causal = CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=dtype, device="cuda", seed=300 + case)
    mq, mk = max(lq), max(lk)
    plans = _plans()
    before = plans.hits + plans.misses
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, return_lse=True, backend="cute")
    assert plans.hits + plans.misses == before + 1, "the call did not take the decode path"
    _compare(o, l, q, k, v, cq, ck, mq, mk, C, K, causal, None, dtype)
    o2, l2 = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, return_lse=True, backend="cute")
    assert torch.equal(o, o2) and torch.equal(l, l2), "not bitwise deterministic"


@pytest.mark.parametrize("C,K", [(64, 4), (1024, 2), (4096, 2)], ids=["per-head", "group-select", "every-chunk"])
@pytest.mark.parametrize("D", [32, 256])
def test_decode_other_head_dims(D, C, K):
    lq, lk = [1, 2], [5000, 333]
    q, k, v, cq, ck = make_batch(lq, lk, 4, 2, D, dtype=torch.bfloat16, device="cuda", seed=7)
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, 2, 5000, C, K, return_lse=True, softmax_scale=0.2,
                                      backend="cute")
    _compare(o, l, q, k, v, cq, ck, 2, 5000, C, K, True, 0.2, torch.bfloat16)


@pytest.mark.parametrize("C,K", [(128, 4), (1024, 2), (1024, 3)], ids=["per-head", "group-select", "every-chunk"])
@pytest.mark.parametrize("n", [1, 3])
def test_decode_padded_cache_layout_in_place(n, C, K):
    """transformers' cache (B, Hk, S, D) and query (B, H, n, D), transposed views: read in place."""
    B, H, Hk, D, S = 3, 8, 2, 128, 2500
    g = torch.Generator(device="cuda").manual_seed(11)
    kc = torch.randn(B, Hk, S, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(B, Hk, S, D, device="cuda", generator=g).to(torch.bfloat16)
    qh = torch.randn(B, H, n, D, device="cuda", generator=g).to(torch.bfloat16)
    q4, k4, v4 = (t.transpose(1, 2) for t in (qh, kc, vc))
    assert not k4.is_contiguous()
    out, lse = moba_cute.attention(q4, k4, v4, C, K, return_lse=True, backend="cute")
    assert out.shape == (B, n, H, D) and lse.shape == (B, H, n)
    qv, kv, vv = (t.reshape(-1, t.shape[2], D) for t in (q4.contiguous(), k4.contiguous(), v4.contiguous()))
    cq = torch.arange(B + 1, dtype=torch.int32, device="cuda") * n
    ck = torch.arange(B + 1, dtype=torch.int32, device="cuda") * S
    _compare(out.reshape(-1, H, D), lse.permute(1, 0, 2).reshape(H, -1), qv, kv, vv, cq, ck, n, S, C, K, True, None,
             torch.bfloat16)
    # the varlen call on the packed copies gives the same bits
    o2, l2 = moba_cute.varlen_attention(qv, kv, vv, cq, ck, n, S, C, K, return_lse=True, backend="cute")
    assert torch.equal(o2, out.reshape(-1, H, D))


def test_decode_matches_general_path():
    lq, lk = [2, 1, 4], [3000, 1200, 64]
    q, k, v, cq, ck = make_batch(lq, lk, 8, 2, 128, dtype=torch.bfloat16, device="cuda", seed=21)
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, 4, 3000, 64, 6, return_lse=True)
    interface.set_decode_path(False)
    try:
        plans = _plans()
        before = plans.hits + plans.misses
        og, lg = moba_cute.varlen_attention(q, k, v, cq, ck, 4, 3000, 64, 6, return_lse=True)
        assert plans.hits + plans.misses == before
    finally:
        interface.set_decode_path(True)
    assert (o.float() - og.float()).abs().max().item() < 2e-2
    assert (l - lg).abs().max().item() < 1e-3


def test_decode_with_grad_uses_general_path():
    q, k, v, cq, ck = make_batch([1], [500], 2, 2, 64, dtype=torch.bfloat16, device="cuda", seed=3,
                                 requires_grad=True)
    plans = _plans()
    before = plans.hits + plans.misses
    out = moba_cute.varlen_attention(q, k, v, cq, ck, 1, 500, 64, 3)
    out.float().sum().backward()
    assert plans.hits + plans.misses == before
    assert q.grad is not None and k.grad is not None


def test_decode_cuda_graph():
    lq, lk = [1, 1], [5000, 700]
    q, k, v, cq, ck = make_batch(lq, lk, 8, 2, 128, dtype=torch.bfloat16, device="cuda", seed=9)
    eager = moba_cute.varlen_attention(q, k, v, cq, ck, 1, 5000, 128, 8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moba_cute.varlen_attention(q, k, v, cq, ck, 1, 5000, 128, 8)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moba_cute.varlen_attention(q, k, v, cq, ck, 1, 5000, 128, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("C,L,H", [(64, 1000, 2), (1024, 6000, 4)], ids=["per-head", "group-select"])
def test_decode_nan_key_reaches_rows_that_see_it(C, L, H):
    """A NaN key makes its chunk's score NaN (ranked first, as in the reference) and every row
    attending it NaN; rows of other sequences stay finite."""
    lq, lk = [1, 1], [L, L]
    q, k, v, cq, ck = make_batch(lq, lk, H, 2, 64, dtype=torch.bfloat16, device="cuda", seed=4)
    k[C + 36, 0, 5] = float("nan")  # sequence 0, chunk 1, KV head 0
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, 1, L, C, 3, return_lse=True, backend="cute")
    o32, l32 = reference.attention(q, k, v, reference.route(q, k, cq, ck, 1, L, C, 3))
    assert torch.equal(torch.isnan(o), torch.isnan(o32))
    assert torch.isnan(o[0, 0]).all() and not torch.isnan(o[1]).any()


@pytest.mark.parametrize("K", [3, 16], ids=["selective", "every-chunk"])
def test_decode_rows_outside_the_sequences_get_zero(K):
    """Invalid cu_seqlens_q (rows past its end) or a too small max_seqlen_q (not checked on CUDA
    outside strict mode): those rows get out = 0 and lse = -inf, never uninitialized memory."""
    q, k, v, _, ck = make_batch([3, 3], [500, 300], 4, 2, 64, dtype=torch.bfloat16, device="cuda", seed=13)
    cq = torch.tensor([0, 2, 3], dtype=torch.int32, device="cuda")  # rows 3..5 in no sequence
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, 2, 500, 32, K, return_lse=True, backend="cute")
    assert torch.equal(o[3:], torch.zeros_like(o[3:])) and bool(torch.isneginf(l[:, 3:]).all())
    _compare(o[:3], l[:, :3], q[:3], k, v, cq, ck, 2, 500, 32, K, True, None, torch.bfloat16)
    cq = torch.tensor([0, 3, 6], dtype=torch.int32, device="cuda")
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, 2, 500, 32, K, return_lse=True, backend="cute")  # max_q < 3
    for r in (2, 5):
        assert torch.equal(o[r], torch.zeros_like(o[r])) and bool(torch.isneginf(l[:, r]).all())


CENT_CASES = [
    # lens_q, lens_k, H, Hk, C, K, causal
    ([1], [4097], 8, 2, 128, 8, True),  # per-head kernel
    ([3, 16], [113, 5000], 8, 1, 48, 5, True),  # several queries, uneven chunks
    ([5, 1], [900, 40], 4, 4, 64, 3, False),  # non-causal: a partial last chunk scored from K
    ([1] * 40, _MANY_K, 8, 2, 32, 3, True),  # many sequences, some without a full chunk
    ([1, 1], [20000, 9000], 16, 4, 4096, 3, True),  # long chunks: the union (group kernel)
    ([1, 2], [6000, 3000], 8, 4, 1024, 2, False),  # the union, non-causal
]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(CENT_CASES)))
def test_decode_cached_centroids(case, D):
    """key_centroids on the GPU: the chunk means (as the reference computes them); a decode step
    that reads them instead of K takes the same routing, so it returns the same bits; and the
    cache is what the step reads (negated centroids select other chunks)."""
    lq, lk, H, Hk, C, K, causal = CENT_CASES[case]
    q, k, v, cq, ck = make_batch(lq, lk, H, Hk, D, dtype=torch.bfloat16, device="cuda", seed=900 + case)
    mq, mk = max(lq), max(lk)
    cent = moba_cute.key_centroids(k, C, ck, mk)
    ref = moba_cute.key_centroids(k.cpu(), C, ck.cpu(), mk, backend="reference")
    torch.testing.assert_close(cent.cpu(), ref, rtol=1e-5, atol=1e-5)
    o, l = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, return_lse=True, backend="cute")
    o2, l2 = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, return_lse=True, backend="cute",
                                        key_centroids=cent)
    assert torch.equal(o, o2) and torch.equal(l, l2)
    if case in (0, 4):  # rows with more candidate chunks than topk - 1: the worst ones instead
        o3 = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, C, K, causal, backend="cute",
                                        key_centroids=-cent)
        assert not torch.equal(o3, o)


def test_decode_cached_centroids_incremental_padded():
    """A decode loop on transformers' cache layout: the cache built at the prefill, extended
    as chunks fill up, gives every step the bits of the uncached step."""
    B, H, Hk, D, C, K, S0, steps = 2, 8, 2, 128, 64, 3, 250, 80
    g = torch.Generator(device="cuda").manual_seed(12)
    kc = torch.randn(B, Hk, S0 + steps, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(B, Hk, S0 + steps, D, device="cuda", generator=g).to(torch.bfloat16)
    cent = torch.zeros(B, (S0 + steps) // C, Hk, D, device="cuda")
    moba_cute.key_centroids(kc[:, :, :S0].transpose(1, 2), C, out=cent)
    done = S0 // C
    for t in range(steps):
        S = S0 + t + 1
        k4, v4 = kc[:, :, :S].transpose(1, 2), vc[:, :, :S].transpose(1, 2)
        if S // C > done:
            moba_cute.key_centroids(k4, C, out=cent, start_chunk=done)
            done = S // C
        q4 = torch.randn(B, 1, H, D, device="cuda", generator=g).to(torch.bfloat16)
        o = moba_cute.attention(q4, k4, v4, C, K, backend="cute")
        o2 = moba_cute.attention(q4, k4, v4, C, K, backend="cute", key_centroids=cent)
        assert torch.equal(o, o2), t
