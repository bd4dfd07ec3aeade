"""Shared test input builders."""

import torch


def make_cu(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_batch(lens_q, lens_k, H, Hk, D, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    k = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, make_cu(lens_q, device), make_cu(lens_k, device)
