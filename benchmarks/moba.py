"""moba_cute implementations: the CuTe kernel paths (``moba_cute.sm90`` / ``moba_cute.sm80``)
and the PyTorch reference (``reference``), through the public API."""

from __future__ import annotations

from .common import Inputs, Runner, Unsupported, grad_fn

__all__ = ["import_moba", "kernel_paths", "moba_runner", "cute_impl_name"]


def import_moba():
    """The moba_cute module, or raise Unsupported saying why not."""
    try:
        import moba_cute
    except Exception as e:
        raise Unsupported(f"moba_cute not importable ({type(e).__name__}: {e})") from None
    for name in ("varlen_attention", "route"):
        if not hasattr(moba_cute, name):
            raise Unsupported(f"moba_cute has no {name}() yet")
    return moba_cute


def kernel_paths(device=None) -> dict:
    """``moba_cute.kernel_paths()``, or all-None when unavailable."""
    try:
        mc = import_moba()
        fn = getattr(mc, "kernel_paths", None)
        if fn is None:
            return {"route": None, "attention": None, "attention_backward": None}
        paths = fn(device)
        return {"route": paths.get("route"), "attention": paths.get("attention")}
    except Exception as e:  # noqa: BLE001 - a broken kernel module must not stop the baselines
        print(f"moba_cute.kernel_paths() failed ({type(e).__name__}: {e}): no kernel path used")
        return {"route": None, "attention": None, "attention_backward": None}


def cute_impl_name(paths: dict) -> str | None:
    arch = paths.get("attention") or paths.get("route")
    return f"moba_cute.{arch}" if arch else None


def moba_runner(inp: Inputs, backend: str, paths: dict | None = None) -> Runner:
    """Runner for ``backend`` "cute" (kernel paths) or "reference".

    routing_ms: ``moba_cute.route`` alone; fwd_ms: ``varlen_attention`` (routing included);
    fwdbwd_ms: that plus ``torch.autograd.grad`` to q, k, v. With backend "cute" and a routing
    kernel but no attention kernel, only the routing is timed (fwd/fwdbwd null, noted).
    """
    mc = import_moba()
    cfg = inp.cfg
    q, k, v, cu, m = inp.q, inp.k, inp.v, inp.cu_seqlens, inp.max_seqlen
    C, K = cfg.C, cfg.K
    if backend == "reference":
        impl = "reference"
    else:
        paths = paths or kernel_paths(q.device)
        impl = cute_impl_name(paths)
        if impl is None:
            raise Unsupported("no CuTe kernel path on this device")
    r = Runner(impl)
    qd, kd = q.detach(), k.detach()

    def route():
        return mc.route(qd, kd, cu, cu, m, m, C, K, cfg.causal, backend=backend).selection

    def fwd():
        return mc.varlen_attention(q, k, v, cu, cu, m, m, C, K, causal=cfg.causal, backend=backend)

    if backend == "reference" or (paths and paths.get("route")):
        r.route = route
    else:
        r.notes.append("no CuTe routing kernel on this device")
    if backend == "reference" or (paths and paths.get("attention")):
        r.fwd = fwd
        r.fwdbwd = grad_fn(fwd, (q, k, v), lambda out: inp.dout)
    else:
        r.notes.append("no CuTe attention kernel yet: fwd/fwdbwd not measured")
    return r
