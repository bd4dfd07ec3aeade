"""Every bad-input rule of SPEC section 2 raises a clear exception naming the argument."""

import pytest
import torch

import moba_cute
from moba_cute import UnsupportedError

from helpers import make_batch, make_cu


def good(dtype=torch.float32):
    q, k, v, cu_q, cu_k = make_batch([20, 12], [20, 12], 4, 2, 16, dtype=dtype)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=20,
                chunk_size=16, topk=2)


def call(**over):
    args = good()
    args.update(over)
    return moba_cute.varlen_attention(**args)


def test_good_input_runs():
    assert call().shape == (32, 4, 16)


BAD = [
    # (id, overrides builder, exception type, message fragment)
    ("q-not-tensor", lambda a: dict(q=a["q"].numpy()), TypeError, "q must be a torch.Tensor"),
    ("q-wrong-rank", lambda a: dict(q=a["q"][None]), ValueError, "q must have shape (total_q, num_heads, head_dim)"),
    ("k-wrong-rank", lambda a: dict(k=a["k"][0]), ValueError, "k must have shape"),
    ("q-int-dtype", lambda a: dict(q=a["q"].to(torch.int32)), TypeError, "q must be float16, bfloat16, float32 or float64"),
    ("k-dtype-mismatch", lambda a: dict(k=a["k"].double()), TypeError, "k must have the same dtype as q"),
    ("v-dtype-mismatch", lambda a: dict(v=a["v"].half()), TypeError, "v must have the same dtype as q"),
    ("v-shape", lambda a: dict(v=a["v"][:-1]), ValueError, "v must have the same shape as k"),
    ("k-head-dim", lambda a: dict(k=a["k"][..., :8].contiguous(), v=a["v"][..., :8].contiguous()), ValueError,
     "k must have the same head_dim as q"),
    ("q-last-dim-stride", lambda a: dict(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "q must be contiguous in its last dimension"),
    ("heads-not-multiple", lambda a: dict(q=torch.randn(32, 3, 16)), ValueError,
     "number of query heads (3) must be a multiple of the number of KV heads of k (2)"),
    ("cu-not-tensor", lambda a: dict(cu_seqlens_q=[0, 20, 32]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ("cu-int64", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].long()), TypeError, "cu_seqlens_k must be int32"),
    ("cu-2d", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q must be a 1-D tensor"),
    ("cu-too-short", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][:1]), ValueError, "cu_seqlens_q must be a 1-D tensor of batch+1 >= 2"),
    ("cu-length-mismatch", lambda a: dict(cu_seqlens_k=make_cu([20, 6, 6])), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have the same length"),
    ("cu-not-zero-start", lambda a: dict(cu_seqlens_q=torch.tensor([1, 20, 32], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    ("cu-decreasing", lambda a: dict(cu_seqlens_k=torch.tensor([0, 20, 12, 32], dtype=torch.int32),
                                     cu_seqlens_q=make_cu([10, 10, 12])), ValueError, "cu_seqlens_k must be non-decreasing"),
    ("cu-wrong-total", lambda a: dict(cu_seqlens_q=make_cu([20, 11])), ValueError,
     "cu_seqlens_q must end at the total number of tokens (32)"),
    ("max-seqlen-small", lambda a: dict(max_seqlen_k=19), ValueError,
     "max_seqlen_k (19) is smaller than the longest sequence in cu_seqlens_k (20)"),
    ("max-seqlen-negative", lambda a: dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be a non-negative integer"),
    ("max-seqlen-float", lambda a: dict(max_seqlen_q=20.0), ValueError, "max_seqlen_q must be a non-negative integer"),
    ("chunk-zero", lambda a: dict(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
    ("chunk-float", lambda a: dict(chunk_size=16.0), ValueError, "chunk_size must be a positive integer"),
    ("topk-zero", lambda a: dict(topk=0), ValueError, "topk must be an integer >= 1"),
    ("topk-bool", lambda a: dict(topk=True), ValueError, "topk must be an integer >= 1"),
    ("causal-not-bool", lambda a: dict(causal=1), TypeError, "causal must be a bool"),
    ("scale-negative", lambda a: dict(softmax_scale=-0.1), ValueError, "softmax_scale must be a finite positive number"),
    ("scale-nan", lambda a: dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite positive number"),
    ("scale-tensor", lambda a: dict(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale must be None or a real number"),
    ("backend-unknown", lambda a: dict(backend="triton"), ValueError, "backend must be one of"),
    ("return-lse-not-bool", lambda a: dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    ("deterministic-not-bool", lambda a: dict(deterministic=None), TypeError, "deterministic must be a bool"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(bad):
    _, build, exc, frag = bad
    with pytest.raises(exc) as info:
        call(**build(good()))
    assert frag in str(info.value)


def test_device_mismatch_raises():
    a = good()
    meta_k = a["k"].to("meta")
    with pytest.raises(ValueError, match="k must be on the same device as q"):
        call(k=meta_k, v=a["v"].to("meta"))
    with pytest.raises(ValueError, match="cu_seqlens_q must be on the same device as q"):
        call(cu_seqlens_q=a["cu_seqlens_q"].to("meta"))


def test_route_validates_too():
    a = good()
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        moba_cute.route(a["q"], a["k"], a["cu_seqlens_q"], a["cu_seqlens_k"], 20, 20, 16, -3)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        moba_cute.route(a["q"], a["k"], a["cu_seqlens_q"].long(), a["cu_seqlens_k"], 20, 20, 16, 2)


def test_attention_with_routing_checks_routing():
    a = good()
    r = moba_cute.route(a["q"], a["k"], a["cu_seqlens_q"], a["cu_seqlens_k"], 20, 20, 16, 2)
    with pytest.raises(TypeError, match="routing must be a moba_cute.Routing"):
        moba_cute.attention_with_routing(a["q"], a["k"], a["v"], r.selection)
    with pytest.raises(ValueError, match="routing was made for"):
        moba_cute.attention_with_routing(a["q"][:10], a["k"], a["v"], r)
    with pytest.raises(ValueError, match="routing was made for 2 KV heads but k has 1"):
        moba_cute.attention_with_routing(a["q"], a["k"][:, :1], a["v"][:, :1], r)


def test_padded_validation():
    q = torch.randn(2, 10, 4, 16)
    k = torch.randn(3, 10, 2, 16)
    with pytest.raises(ValueError, match="k must have the same batch size as q"):
        moba_cute.attention(q, k, k, 16, 2)
    with pytest.raises(ValueError, match=r"q must have shape \(batch, seqlen_q, num_heads, head_dim\)"):
        moba_cute.attention(q[0], k[0], k[0], 16, 2)
    with pytest.raises(ValueError, match="at least one sequence"):
        moba_cute.attention(q[:0], k[:0], k[:0], 16, 2)


def test_cute_backend_on_cpu_is_a_clear_error():
    with pytest.raises(UnsupportedError, match="backend='cute' needs CUDA tensors"):
        call(backend="cute")


def test_reference_backend_is_explicitly_selectable():
    a = good()
    out_auto = call()
    out_ref = call(backend="reference")
    assert torch.equal(out_auto, out_ref)
    assert moba_cute.kernel_paths("cpu") == {"route": None, "attention": None, "attention_backward": None,
                                             "decode": None}


def test_kernel_paths_name_each_family_a_device_runs(monkeypatch):
    # (no GPU here: the device's arch is what kernel_paths would read from it)
    from moba_cute import interface
    from moba_cute.configs import routing as rcfg

    dev = torch.device("cuda", 0)
    for arch, want in (("sm90", "sm90"), ("sm80", "sm80")):
        monkeypatch.setitem(interface._ARCHS, 0, arch)
        paths = moba_cute.kernel_paths(dev)
        # the routing's top-k scores with warpgroup MMA on sm90 (head dims 64 / 128)
        assert rcfg.topk_wgmma_ok(arch, 128, 128) == (want == "sm90")
        assert paths == {"route": want, "attention": want, "attention_backward": want, "decode": want}, paths


def test_nothing_is_computed_before_validation(monkeypatch):
    from moba_cute import reference

    def boom(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(reference, "route", boom)
    monkeypatch.setattr(reference, "attention", boom)
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=-1)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(max_seqlen_k=3)
