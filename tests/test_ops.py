"""The custom ops' fake implementations give the documented shapes without touching data."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moba_cute.ops import route_op
from moba_cute.routing import num_chunks_bound


def test_route_op_fake_shapes():
    with FakeTensorMode():
        q = torch.empty(1000, 8, 128, dtype=torch.bfloat16)
        k = torch.empty(1200, 2, 128, dtype=torch.bfloat16)
        cu_q = torch.empty(4, dtype=torch.int32)
        cu_k = torch.empty(4, dtype=torch.int32)
        sel, offs, rows, cuc = route_op(q, k, cu_q, cu_k, 600, 700, 64, 5, True)
    nb = num_chunks_bound(1200, 3, 64)
    assert nb == (1200 + 3 * 63) // 64
    assert sel.shape == (1000, 8, 5) and sel.dtype == torch.int32
    assert offs.shape == (nb * 8 + 1,) and rows.shape == (1000 * 8 * 5,) and cuc.shape == (4,)


def test_num_chunks_bound_is_an_upper_bound():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(0, 300, (b,), generator=g)
        c = int(torch.randint(1, 80, (1,), generator=g))
        real = int(((lens + c - 1) // c).sum())
        assert real <= num_chunks_bound(int(lens.sum()), b, c)


def test_attention_ops_fake_shapes():
    from moba_cute.ops import attention_bwd_op, attention_op

    with FakeTensorMode():
        q = torch.empty(1000, 8, 64, dtype=torch.float16)
        k = torch.empty(1200, 2, 64, dtype=torch.float16)
        i = lambda *s: torch.empty(*s, dtype=torch.int32)  # noqa: E731
        routing = (i(1000, 8, 5), i(100), i(40000), i(4), i(4), i(4), 600, 700, 64, 5, True, None, False)
        out, lse = attention_op(q, k, k, *routing)
        dq, dk, dv = attention_bwd_op(out, None, q, k, k, out, lse, *routing)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (8, 1000) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_routing_from_tensors_rebuilds_a_routing():
    import moba_cute
    from moba_cute.ops import routing_from_tensors

    q = torch.randn(50, 4, 16)
    k = torch.randn(60, 2, 16)
    cu_q = torch.tensor([0, 20, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 25, 60], dtype=torch.int32)
    r = moba_cute.route(q, k, cu_q, cu_k, 30, 35, 16, 3, True)
    args = (q, k, cu_q, cu_k, 30, 35, 16, 3, True)  # route_op's argument order
    r2 = routing_from_tensors(r.selection, r.offsets, r.query_rows, r.cu_chunks, *args[2:], 2)
    assert r2 == r
