"""CPU: the transformers integration (``attn_implementation="moba"``) on a tiny randomly initialised
Llama-style model (no download), through the PyTorch reference: dense equivalence when topk covers
every chunk, padded and packed batches against separate sequences, greedy generation with a KV
cache against the full forward, per-layer settings, and a training step."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moba_cute.integrations.transformers as mt  # noqa: E402

VOCAB = 97


def _models(chunk=16, topk=64, **extra):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   moba_chunk_size=chunk, moba_topk=topk, **extra)
    torch.manual_seed(0)
    moba = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="moba").eval()
    dense = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    dense.load_state_dict(moba.state_dict())
    assert moba.config._attn_implementation == "moba"
    return moba, dense


def _ids(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def test_dense_when_topk_covers_every_chunk():
    moba, dense = _models(chunk=16, topk=64)
    ids = _ids(2, 70)
    with torch.no_grad():
        a, b = moba(ids).logits, dense(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_sparse_differs_from_dense():
    moba, dense = _models(chunk=8, topk=2)
    ids = _ids(1, 64)
    with torch.no_grad():
        a, b = moba(ids).logits, dense(ids).logits
    assert torch.allclose(a[:, :16], b[:, :16], atol=1e-4)  # the first two chunks see every key
    assert (a[:, 32:] - b[:, 32:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_separate_sequences(side):
    moba, _ = _models(chunk=8, topk=2)
    lens = [50, 31]
    seqs = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    ids = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(50 - len(s), 50) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = moba(ids, attention_mask=mask, position_ids=pos).logits
        for i, s in enumerate(seqs):
            ref = moba(s[None]).logits[0]
            sl = slice(50 - len(s), 50) if side == "left" else slice(0, len(s))
            assert (out[i, sl] - ref).abs().max().item() < 1e-4


def test_packed_position_ids_match_separate_sequences():
    moba, _ = _models(chunk=8, topk=2)
    lens = [30, 17, 41]
    seqs = [_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lens)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        out = moba(ids, position_ids=pos).logits[0]
        o = 0
        for s in seqs:
            ref = moba(s[None]).logits[0]
            assert (out[o:o + len(s)] - ref).abs().max().item() < 1e-4
            o += len(s)


def test_flash_attention_style_cu_seqlens():
    moba, _ = _models(chunk=8, topk=2)
    layer = moba.model.layers[0].self_attn
    lens = [12, 29]
    q = torch.randn(1, 4, 41, 16)
    k, v = torch.randn(1, 2, 41, 16), torch.randn(1, 2, 41, 16)
    cu = torch.tensor([0, 12, 41], dtype=torch.int32)
    out, _ = mt.moba_attention_forward(layer, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                       max_length_q=29, max_length_k=29)
    for a, b in zip([0, 12], lens):
        o1, _ = mt.moba_attention_forward(layer, q[:, :, a:a + b], k[:, :, a:a + b], v[:, :, a:a + b], None,
                                          scaling=0.25)
        assert (out[:, a:a + b] - o1).abs().max().item() < 1e-5


def test_greedy_generation_matches_the_full_forward():
    moba, _ = _models(chunk=8, topk=2)
    prompt = _ids(2, 21)
    with torch.no_grad():
        gen = moba.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                            min_new_tokens=24, pad_token_id=0)
        logits = moba(gen).logits
    assert gen.shape == (2, 45)
    # every generated token is the argmax of the full (cache-free) forward at the previous position
    assert torch.equal(logits[:, 20:-1].argmax(-1), gen[:, 21:])


def test_layer_settings():
    cfg = transformers.LlamaConfig(num_hidden_layers=4, moba_chunk_size=[64, 64, 128, 128], moba_topk=3,
                                   moba_dense_last_layers=1)
    assert [mt.layer_settings(cfg, i) for i in range(4)] == [(64, 3), (64, 3), (128, 3), None]
    cfg = transformers.LlamaConfig(num_hidden_layers=2, moba_topk=[None, 5])
    assert mt.layer_settings(cfg, 0) is None
    assert mt.layer_settings(cfg, 1) == (mt.DEFAULT_CHUNK_SIZE, 5)
    with pytest.raises(ValueError, match="moba_chunk_size has 3 entries"):
        mt.layer_settings(transformers.LlamaConfig(num_hidden_layers=2, moba_chunk_size=[1, 2, 3]), 0)


def test_dense_last_layers_are_dense():
    moba, dense = _models(chunk=8, topk=1, moba_dense_last_layers=3)  # every layer dense
    ids = _ids(1, 40)
    with torch.no_grad():
        assert (moba(ids).logits - dense(ids).logits).abs().max().item() < 1e-4


def test_training_step_gradients():
    moba, _ = _models(chunk=8, topk=2)
    moba.train()
    ids = _ids(2, 33)
    loss = moba(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in moba.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert moba.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_attention_dropout_is_refused_in_training():
    moba, _ = _models(chunk=8, topk=2, attention_dropout=0.1)
    moba.train()
    with pytest.raises(ValueError, match="dropout"):
        moba(_ids(1, 16))
