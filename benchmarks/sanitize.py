"""Small adversarial forward+backward calls through the CuTe path, to run under compute-sanitizer
on the GPU machine (routing, per-slot index, attention forward, row-wise and backward kernels):

    compute-sanitizer --tool memcheck --report-api-errors no python3 -m benchmarks.sanitize
    compute-sanitizer --tool racecheck --report-api-errors no python3 -m benchmarks.sanitize

Shapes: uneven varlen with a 1-token sequence, Sq != Sk with an empty sequence and empty rows
(GQA 4:1), non-causal with topk above the chunk count and a chunk size that does not divide
the lengths, 300 tiny sequences. Run before the sanitizer once without it, so the kernels are
compiled (the DSL's disk cache) outside the sanitized run.
"""

import torch

import moba_cute

CASES = [  # lens_q, lens_k, H, Hk, C, K, causal
    ([1, 17, 113, 300], [1, 17, 113, 300], 4, 4, 64, 4, True),
    ([50, 0, 70], [90, 5, 40], 4, 1, 32, 3, True),
    ([40, 200], [40, 200], 2, 2, 48, 9, False),
    ([3] * 300, [3] * 300, 2, 2, 16, 2, True),
]


def _cu(lens, dev):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for lq, lk, H, Hk, C, K, causal in CASES:
        cq, ck = _cu(lq, dev), _cu(lk, dev)
        q = torch.randn(sum(lq), H, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(sum(lk), Hk, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(sum(lk), Hk, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        o, lse = moba_cute.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), C, K, causal, return_lse=True,
                                            backend="cute")
        (o.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
        torch.cuda.synchronize()
        print(f"ok: lens_q={lq[:4]} lens_k={lk[:4]} H={H} Hk={Hk} C={C} K={K} causal={causal}", flush=True)


if __name__ == "__main__":
    main()
