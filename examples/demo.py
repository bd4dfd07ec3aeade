"""make demo: the main job of this repository on whatever machine it runs on.

With a CUDA GPU: the `quick` benchmark suite (moba_cute against dense FlashAttention).
Without one: a small MoBA attention layer run through the public API on the CPU, checked
against dense causal attention in the case where topk covers every chunk (MoBA is then
exactly dense causal attention), and a sparse case with its selection statistics.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moba_cute  # noqa: E402


class MoBASelfAttention(torch.nn.Module):
    """A minimal GQA self-attention layer whose attention is MoBA over a packed batch."""

    def __init__(self, dim, heads, kv_heads, chunk_size, topk):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.chunk_size, self.topk = chunk_size, topk
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, cu_seqlens, max_seqlen, topk=None):
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.d, self.hk * self.d, self.hk * self.d], -1)
        q, k, v = q.view(t, self.h, self.d), k.view(t, self.hk, self.d), v.view(t, self.hk, self.d)
        o = moba_cute.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       self.chunk_size, topk or self.topk, causal=True)
        return self.proj(o.reshape(t, -1)), (q, k, v)


def dense_causal(q, k, v, cu):
    g = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0), is_causal=True).transpose(0, 1))
    return torch.cat(outs)


def cpu_demo():
    torch.manual_seed(0)
    lens = [1000, 37, 2048, 513]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    layer = MoBASelfAttention(dim=256, heads=8, kv_heads=2, chunk_size=64, topk=4)
    x = torch.randn(sum(lens), 256)
    print(f"moba_cute {moba_cute.__version__} demo on the CPU (torch {torch.__version__}, reference backend)")
    print(f"packed batch: {len(lens)} sequences {lens}, H=8, Hk=2 (GQA), D=32, chunk_size=64")

    t0 = time.perf_counter()
    y, (q, k, v) = layer(x, cu, max(lens), topk=64)  # 64 chunks x 64 >= every sequence: dense
    full = moba_cute.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), 64, 64)
    err = (full - dense_causal(q, k, v, cu)).abs().max().item()
    print(f"topk=64 covers every chunk -> MoBA == dense causal attention: max |diff| = {err:.2e} "
          f"({time.perf_counter() - t0:.2f} s)")
    assert err < 1e-4, "MoBA with all chunks selected must equal dense causal attention"

    t0 = time.perf_counter()
    y, (q, k, v) = layer(x, cu, max(lens))
    y.square().mean().backward()
    r = moba_cute.route(q.detach(), k.detach(), cu, cu, max(lens), max(lens), 64, 4)
    used = (r.selection >= 0).sum(-1).float()
    print(f"topk=4: forward+backward through the layer in {time.perf_counter() - t0:.2f} s; "
          f"chunks per query: mean {used.mean():.2f} (own chunk always first), "
          f"grad norm of qkv weight {layer.qkv.weight.grad.norm():.3f}")
    c = r.counts.sum(1)
    print(f"key-major index: {int(r.offsets[-1])} (query, head, chunk) selections over "
          f"{int(r.cu_chunks[-1])} chunks; busiest chunk chosen {int(c.max())} times")
    print("demo OK")


def main():
    if torch.cuda.is_available():
        from benchmarks.run import main as bench_main

        return bench_main(["--suite", "quick"])
    cpu_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
