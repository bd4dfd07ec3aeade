"""Dense causal baselines: FlashAttention-2 (PyTorch SDPA, flash backend) and FlashAttention-4
(CuTe DSL, ``flash_attn.cute``), on the same packed inputs as the MoBA implementations.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

import torch
import torch.nn.functional as F

from .common import Inputs, Runner, Unsupported, grad_fn

__all__ = ["fa2_runner", "fa4_runner", "fa4_available", "fa4_version"]


def _b_s(inp: Inputs):
    cfg = inp.cfg
    if cfg.varlen:
        return None
    return cfg.B, cfg.S


def fa2_runner(inp: Inputs) -> Runner:
    """FA2 through ``scaled_dot_product_attention`` under ``sdpa_kernel(FLASH_ATTENTION)`` in
    the (B, H, S, D) layout (zero-copy transposed views of the packed inputs).

    GQA: ``enable_gqa=True`` if the flash backend takes it; otherwise K/V are expanded to H
    heads once, outside the timed region (their gradients are then per expanded head).
    Varlen batches: SDPA has no varlen causal path, so the same FA2 kernel is called through
    ``torch.ops.aten._flash_attention_forward`` with cu_seqlens (native GQA there).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = inp.cfg
    H, Hk, D = cfg.H, cfg.Hk, cfg.D
    r = Runner("fa2")
    q, k, v = inp.q, inp.k, inp.v

    if cfg.varlen:
        cu, m = inp.cu_seqlens, inp.max_seqlen
        op = torch.ops.aten._flash_attention_forward

        def fwd():
            return op(q, k, v, cu, cu, m, m, 0.0, True, False)[0]

        r.fwd = fwd
        r.fwdbwd = grad_fn(fwd, (q, k, v), lambda out: inp.dout)
        r.notes.append("varlen via torch.ops.aten._flash_attention_forward (SDPA's FA2 kernel)")
        return r

    B, S = _b_s(inp)

    def bhsd(t, h):
        return t.view(B, S, h, D).transpose(1, 2)

    def sdpa(qq, kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if gqa:
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

    leaves = (q, k, v)
    kk_leaf = vv_leaf = None
    gqa = H != Hk
    if gqa:
        # Probe enable_gqa on a tiny problem of the same head counts.
        try:
            t = torch.randn(1, 128, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
            tk = torch.randn(1, 128, Hk, D, device=q.device, dtype=q.dtype).transpose(1, 2)
            sdpa(t, tk, tk, True)
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise
            gqa = False
            kk_leaf = k.detach().repeat_interleave(H // Hk, dim=1).requires_grad_(True)
            vv_leaf = v.detach().repeat_interleave(H // Hk, dim=1).requires_grad_(True)
            leaves = (q, kk_leaf, vv_leaf)
            r.notes.append("flash SDPA lacks enable_gqa: K/V expanded to H heads outside the timed region")

    kl, vl = (kk_leaf, vv_leaf) if kk_leaf is not None else (k, v)
    hk_eff = H if kk_leaf is not None else Hk

    def fwd():
        return sdpa(bhsd(q, H), bhsd(kl, hk_eff), bhsd(vl, hk_eff), gqa)

    r.fwd = fwd
    r.fwdbwd = grad_fn(fwd, leaves, lambda out: bhsd(inp.dout, H))

    def cleanup():
        nonlocal kk_leaf, vv_leaf, kl, vl, leaves
        kk_leaf = vv_leaf = kl = vl = leaves = None

    r.cleanup = cleanup
    return r


_FA4 = None
_FA4_ERR = None


def _load_fa4():
    global _FA4, _FA4_ERR
    if _FA4 is None and _FA4_ERR is None:
        try:
            mod = importlib.import_module("flash_attn.cute")
            _FA4 = (mod.flash_attn_func, mod.flash_attn_varlen_func)
        except Exception as e:  # ImportError, or the DSL failing to initialize
            _FA4_ERR = f"{type(e).__name__}: {e}"
    return _FA4


def fa4_available() -> tuple[bool, str]:
    ok = _load_fa4() is not None
    return ok, ("" if ok else f"flash_attn.cute not importable ({_FA4_ERR})")


def fa4_version() -> str | None:
    for dist in ("flash-attn-4", "flash_attn_4", "fa4"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def fa4_runner(inp: Inputs) -> Runner:
    """FA4 (``flash_attn.cute.flash_attn_func``, (B, S, H, D) views; varlen func for varlen
    batches), dense causal, native GQA."""
    fns = _load_fa4()
    if fns is None:
        raise Unsupported(f"flash_attn.cute not importable ({_FA4_ERR})")
    func, varlen_func = fns
    # The DSL warns on every FA4 compile about arguments it passes through; not ours to fix.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"cutlass(\.|$)")
    cfg = inp.cfg
    q, k, v = inp.q, inp.k, inp.v
    r = Runner("fa4")
    if cfg.varlen:
        cu, m = inp.cu_seqlens, inp.max_seqlen

        def fwd():
            return _first(varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m,
                                      causal=True))

        r.fwd = fwd
        r.fwdbwd = grad_fn(fwd, (q, k, v), lambda out: inp.dout)
        return r
    B, S = _b_s(inp)

    def bshd(t):
        return t.view(B, S, t.shape[1], t.shape[2])

    def fwd():
        return _first(func(bshd(q), bshd(k), bshd(v), causal=True))

    r.fwd = fwd
    r.fwdbwd = grad_fn(fwd, (q, k, v), lambda out: bshd(inp.dout))
    return r
