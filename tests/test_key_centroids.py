"""CPU/CI: moba_cute.key_centroids (the full chunks' centroids, the cache decode steps read instead
of K) -- its values against the chunk means, incremental updates, the packed and padded layouts --
and the validation of the cache where the attention calls take it (``key_centroids=``)."""

import pytest
import torch

import moba_cute
from moba_cute import reference


def _means(kb, C):
    n = kb.shape[0] // C
    return kb[: n * C].to(torch.float64).view(n, C, *kb.shape[1:]).mean(1)


def test_padded_and_packed_match_the_chunk_means():
    torch.manual_seed(0)
    k = torch.randn(3, 1000, 2, 64, dtype=torch.float64)
    cent = moba_cute.key_centroids(k, 96)
    assert cent.dtype == torch.float32 and cent.shape == (3, 1000 // 96, 2, 64)
    for b in range(3):
        torch.testing.assert_close(cent[b].double(), _means(k[b], 96), rtol=1e-6, atol=1e-6)
    # packed, uneven lengths: rows past a sequence's full chunks stay 0 (never read)
    lens = [1000, 95, 300]
    kp = torch.cat([k[b, :n] for b, n in enumerate(lens)])
    cu = torch.tensor([0, 1000, 1095, 1395], dtype=torch.int32)
    c2 = moba_cute.key_centroids(kp, 96, cu, 1000)
    assert c2.shape == (3, 10, 2, 64)
    torch.testing.assert_close(c2[0], cent[0])
    assert c2[1].abs().max() == 0  # 95 keys: no full chunk
    torch.testing.assert_close(c2[2, :3].double(), _means(k[2, :300], 96), rtol=1e-6, atol=1e-6)
    assert c2[2, 3:].abs().max() == 0
    # the same means the reference routing uses (its global chunk numbering)
    ref = reference.centroids(kp.float(), cu, 96)
    torch.testing.assert_close(c2[0], ref[:10], rtol=1e-6, atol=1e-6)


def test_incremental_update_writes_only_new_full_chunks():
    torch.manual_seed(1)
    k = torch.randn(2, 700, 1, 32).to(torch.bfloat16)
    full = moba_cute.key_centroids(k, 64)
    cache = torch.full((2, 16, 1, 32), 7.0)
    moba_cute.key_centroids(k[:, :200], 64, out=cache)  # a prefill of 200 tokens: 3 full chunks
    assert (cache[:, 3:] == 7.0).all()
    torch.testing.assert_close(cache[:, :3], full[:, :3])
    moba_cute.key_centroids(k, 64, out=cache, start_chunk=3)  # grown to 700: chunks 3..9
    torch.testing.assert_close(cache[:, :10], full)
    assert (cache[:, 10:] == 7.0).all()


@pytest.mark.parametrize("bad,err", [
    (dict(out=torch.zeros(2, 4, 2, 64)), "n >= max_seqlen_k // chunk_size"),
    (dict(out=torch.zeros(2, 5, 2, 64, dtype=torch.float64)), "must be float32"),
    (dict(out=torch.zeros(2, 5, 64, 2).transpose(2, 3)), "unit stride"),
    (dict(out=torch.zeros(3, 5, 2, 64)), r"\(2, >= 5, 2, 64\)"),
    (dict(start_chunk=-1), "start_chunk"),
    (dict(cu_seqlens_k=torch.tensor([0, 700], dtype=torch.int32)), "takes no cu_seqlens_k"),
    (dict(backend="cute"), "CuTe kernel"),
])
def test_key_centroids_validation(bad, err):
    k = torch.randn(2, 700, 2, 64)
    with pytest.raises((ValueError, TypeError, moba_cute.UnsupportedError), match=err):
        moba_cute.key_centroids(k, 128, **bad)


def test_key_centroids_packed_needs_offsets():
    k = torch.randn(700, 2, 64)
    with pytest.raises(ValueError, match="needs cu_seqlens_k"):
        moba_cute.key_centroids(k, 128)
    with pytest.raises(ValueError, match="must end at the total"):
        moba_cute.key_centroids(k, 128, torch.tensor([0, 600], dtype=torch.int32), 600)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        moba_cute.key_centroids(k, 128, torch.tensor([0, 700]), 700)
    with pytest.raises(ValueError, match="1-D tensor of batch"):
        moba_cute.key_centroids(k, 128, torch.tensor([700], dtype=torch.int32), 700)


def test_attention_checks_the_cache_it_is_given():
    """The calls validate ``key_centroids`` whatever path runs; off the GPU decode kernels the
    centroids come from k, so a valid cache changes nothing."""
    torch.manual_seed(2)
    q = torch.randn(2, 1, 4, 64)
    k = torch.randn(2, 600, 2, 64)
    v = torch.randn(2, 600, 2, 64)
    cent = moba_cute.key_centroids(k, 128)
    out = moba_cute.attention(q, k, v, 128, 2, key_centroids=cent)
    torch.testing.assert_close(out, moba_cute.attention(q, k, v, 128, 2))
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 600, 1200], dtype=torch.int32)
    o2 = moba_cute.varlen_attention(q.reshape(2, 4, 64), k.reshape(1200, 2, 64), v.reshape(1200, 2, 64), cu_q, cu_k,
                                    1, 600, 128, 2, key_centroids=cent)
    torch.testing.assert_close(o2.view(2, 1, 4, 64), out)
    for bad, err in ((cent[:, :3], "n >= max_seqlen_k"), (cent.double(), "float32"), (cent[:1], r"\(2, >= 4"),
                     (cent.numpy(), "torch.Tensor")):
        with pytest.raises((ValueError, TypeError), match=err):
            moba_cute.attention(q, k, v, 128, 2, key_centroids=bad)
