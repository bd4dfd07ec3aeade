"""CPU numerics study for the planned sm90 backward (docs/design.md section 9): may the dQ
partial buffer hold partials in the input dtype (bf16 / fp16) instead of fp32?

The planned kernel computes, per selected pair (row, head, slot) with chunk j,
``dQ_p = scale * dS_p @ K_j``, ``dS_p = P_p * (dP_p - delta)``, ``P_p = exp(S_p - LSE)``
(fp32 math on input-dtype operands), writes it to a partial buffer at its slot, and a row-wise
kernel sums a row's partials in slot order in fp32 and writes ``dq`` in the input dtype. This
file emulates that in PyTorch with the partials kept in fp32 ("c32") or rounded to the input
dtype ("c16") and checks SPEC section 3's rule for dq: max error <= 3x the error of the same
computation done by PyTorch in the input dtype (the GPU tests' baseline, ``_ref_grads`` of
tests/test_attention_gpu.py), + 1e-5, both against an fp64 reference with the same selection.

``python tests/test_dq_partials_numerics.py --study`` runs the wider study (larger shapes, two
seeds, topk up to 64; ~2 min on one CPU core) behind the table of design.md section 9; without
``--study`` it prints the same columns for the test cases.
"""

import math

import pytest
import torch

from moba_cute import reference
from helpers import make_batch
from test_attention_gpu import _ref_grads  # the dq baseline the GPU tests use

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# name: (lens_q, lens_k, H, Hk, D, C, K, causal, magnitude of q and k, seed). Sized so that the
# file runs in well under a minute on two busy CPU cores.
CASES = {
    "d64-c64-k2-causal": ([700, 333], [700, 333], 4, 4, 64, 64, 2, True, 1.0, 0),
    "d128-c128-k8-causal": ([1024], [1024], 2, 2, 128, 128, 8, True, 1.0, 1),
    "d64-c64-k16-causal-2k": ([2048], [2048], 2, 2, 64, 64, 16, True, 1.0, 2),
    "d128-c64-k16-gqa4-sq<sk": ([160], [1280], 4, 1, 128, 64, 16, True, 1.0, 3),
    "d64-c64-k16-noncausal-sq<sk": ([600], [1024], 2, 1, 64, 64, 16, False, 1.0, 4),
    "d128-c128-k8-noncausal": ([900, 300], [900, 300], 2, 2, 128, 128, 8, False, 1.0, 5),
    "d128-c64-k8-peaky": ([800], [800], 2, 2, 128, 64, 8, True, 4.0, 6),
}


def dq_partials(q, k, v, dout, out, lse, r, scale, compute=torch.float32):
    """The planned kernel's per-pair partials ``scale * dS_p @ K_j``, math in ``compute`` on
    the input-dtype tensors upcast, in a (T, H, topk, D) buffer at their slots (unused slots
    0). ``out`` is the forward output (the kernel's: input dtype), ``lse`` (H, T) (the
    kernel's: fp32). With fp64 and the fp64 forward's out and lse it is the fp64 reference."""
    T, H, D = q.shape
    group = H // k.shape[1]
    C, K, causal = r.chunk_size, r.topk, r.causal
    qf, kf, vf, dof = (t.to(compute) for t in (q, k, v, dout))
    delta = (dof * out.to(compute)).sum(-1)  # (T, H), as the kernels' prep pass
    lse = lse.to(compute)
    buf = torch.zeros(T, H, K, D, dtype=compute)
    cq, ck = r.cu_seqlens_q.tolist(), r.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, sq, k0, sk = cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]
        if sq == 0 or sk == 0:
            continue
        sel = r.selection[q0 : q0 + sq].to(torch.int64)
        pos = torch.arange(sq) + (sk - sq)
        for h in range(H):
            kvh = h // group
            for j in range(-(-sk // C)):
                rr, ss = (sel[:, h, :] == j).nonzero(as_tuple=True)  # local rows, their slots
                if rr.numel() == 0:
                    continue
                kj = kf[k0 + j * C : k0 + min(sk, (j + 1) * C), kvh]
                vj = vf[k0 + j * C : k0 + min(sk, (j + 1) * C), kvh]
                rows = q0 + rr
                s = (qf[rows, h] @ kj.T) * scale
                if causal:
                    t = torch.arange(j * C, j * C + kj.shape[0])
                    s = s.masked_fill(t.view(1, -1) > pos[rr].view(-1, 1), -math.inf)
                p = torch.exp(s - lse[h, rows].view(-1, 1))
                dp = dof[rows, h] @ vj.T
                ds = p * (dp - delta[rows, h].view(-1, 1))
                buf[rows, h, ss] = scale * (ds @ kj)
    return buf


def sum_partials(buf, partial_dtype, out_dtype, acc_dtype=torch.float32):
    """The row-wise kernel: partials stored in ``partial_dtype``, summed in ``acc_dtype`` in slot
    order (an unused slot holds 0: adding it is exact). Returns (the sum, dq in ``out_dtype``)."""
    stored = buf.to(partial_dtype)
    acc = torch.zeros(buf.shape[0], buf.shape[1], buf.shape[3], dtype=acc_dtype)
    for slot in range(buf.shape[2]):
        acc += stored[:, :, slot].to(acc_dtype)
    return acc, acc.to(out_dtype)


def _err(a, b, mask=None):
    d = (a.double() - b.double()).abs()
    if mask is not None:
        d = d[mask]
    return d.max().item() if d.numel() else 0.0


def _fp64_autograd_dq(q, k, v, dout, r, scale):
    """dq of sum(out * dout) through the reference's autograd in fp64."""
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o, _ = reference.attention(qq, kk, vv, r, softmax_scale=scale, compute_dtype=torch.float64)
    (dq,) = torch.autograd.grad((o * dout.double()).sum(), (qq,))
    return dq


def _fp64_truth(q, k, v, dout, r, scale):
    """The fp64 reference dq by the explicit formula (fp64 forward's out and lse, fp64 partials,
    fp64 sum; test_emulation_computes_the_reference_dq checks it against autograd), and the
    fp64 forward's out and lse (the forward kernel hands over these rounded to the input dtype
    and fp32). Cheaper than autograd through the checkpointed reference."""
    o, lse = reference.attention(q, k, v, r, softmax_scale=scale, compute_dtype=torch.float64)
    buf = dq_partials(q, k, v, dout, o, lse, r, scale, compute=torch.float64)
    dq, _ = sum_partials(buf, torch.float64, torch.float64, acc_dtype=torch.float64)
    return dq, o, lse


def _inputs(case, dtype):
    lens_q, lens_k, H, Hk, D, C, K, causal, mag, seed = case
    q, _, _, cq, _ = make_batch(lens_q, lens_q, H, Hk, D, dtype=torch.float64, seed=seed)
    _, k, v, _, ck = make_batch(lens_k, lens_k, H, Hk, D, dtype=torch.float64, seed=seed + 500)
    q, k, v = (q * mag).to(dtype), (k * mag).to(dtype), v.to(dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    r = reference.route(q, k, cq, ck, max(lens_q), max(lens_k), C, K, causal)
    return q, k, v, dout, r, D ** -0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small shapes: one intra-op thread is faster than two, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_MEASURED = {}


def measure(case, dt):
    """Max errors of dq against the fp64 reference (cached): "b" PyTorch in the input dtype
    (the SPEC baseline), "c32" / "c16" the partial scheme with fp32 / input-dtype partials,
    "*_sum" the same before the final rounding, "*_full" over the (row, head) pairs that use
    all topk slots only (the rows where the partials' roundings add up most), "g_*" against
    the GPU tests' reference instead (fp32 autograd, which returns dq in the input dtype)."""
    key = (repr(case), dt)
    if key in _MEASURED:
        return _MEASURED[key]
    dtype = DTYPES[dt]
    q, k, v, dout, r, scale = _inputs(case, dtype)
    with torch.no_grad():
        dq64, o64, lse64 = _fp64_truth(q, k, v, dout, r, scale)
    dq_lp = _ref_grads(q, k, v, r, dout, None, scale, dtype)[0]
    dq_gpu_ref = _ref_grads(q, k, v, r, dout, None, scale, None)[0]  # fp32, returned in q's dtype
    buf = dq_partials(q, k, v, dout, o64.to(dtype), lse64.float(), r, scale)
    full = (r.selection >= 0).all(-1)  # (T, H)
    m = {"b": _err(dq_lp, dq64), "b_full": _err(dq_lp, dq64, full), "ref_max": dq64.abs().max().item(),
         "g_b": _err(dq_lp, dq_gpu_ref)}
    for variant, pdt in (("c32", torch.float32), ("c16", dtype)):
        acc, dq = sum_partials(buf, pdt, dtype)
        m[variant], m[variant + "_sum"] = _err(dq, dq64), _err(acc, dq64)
        m[variant + "_full"] = _err(dq, dq64, full)
        m["g_" + variant] = _err(dq, dq_gpu_ref)
    _MEASURED[key] = m
    return m


def meets_rule(m, variant, ref=""):
    """SPEC section 3 for dq against the fp64 reference (ref "") or the GPU tests' ("g_")."""
    return m[ref + variant] <= 3 * m[ref + "b"] + 1e-5


def test_emulation_computes_the_reference_dq():
    """The partial scheme's formula is the reference's dq: in fp64 it matches the reference's
    autograd to fp64 rounding, and with fp32 math (fp32 inputs, fp32 out and lse) to fp32
    rounding. Causal and not, GQA, uneven chunks, Sq != Sk, a sequence with fewer chunks
    than topk."""
    for causal in (True, False):
        case = ([100, 37], [150, 70], 4, 2, 64, 32, 3, causal, 1.0, 9)
        q, k, v, dout, r, scale = _inputs(case, torch.float64)
        dq_ag = _fp64_autograd_dq(q, k, v, dout, r, scale)
        with torch.no_grad():
            dq64, o64, lse64 = _fp64_truth(q, k, v, dout, r, scale)
            big = dq_ag.abs().max().item()
            assert _err(dq64, dq_ag) <= 1e-12 * big
            qf, kf, vf, df = (t.float() for t in (q, k, v, dout))
            buf = dq_partials(qf, kf, vf, df, o64.float(), lse64.float(), r, scale)
            acc, _ = sum_partials(buf, torch.float32, torch.float32)
            assert 1e-9 * big < _err(acc, dq_ag) <= 1e-5 * big


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_partials_meet_rule(name, dt):
    m = measure(CASES[name], dt)
    assert meets_rule(m, "c32"), f"{name} {dt}: c32 err {m['c32']} > 3 * {m['b']} + 1e-5"
    assert meets_rule(m, "c32", "g_"), f"{name} {dt}: vs the GPU tests' reference {m}"


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_input_dtype_partials_meet_rule(name, dt):
    m = measure(CASES[name], dt)
    assert meets_rule(m, "c16"), f"{name} {dt}: c16 err {m['c16']} > 3 * {m['b']} + 1e-5"
    assert meets_rule(m, "c16", "g_"), f"{name} {dt}: vs the GPU tests' reference {m}"
    # also on the rows that sum all topk partials, against the baseline's error on those rows
    assert m["c16_full"] <= 3 * m["b_full"] + 1e-5, f"{name} {dt}: full rows {m}"


# The wider study behind the table of design.md section 9 (run as a script).
STUDY = {
    "d64-c64-k2-causal": ([700, 333, 1000], [700, 333, 1000], 4, 4, 64, 64, 2, True, 1.0, 10),
    "d128-c128-k2-causal-2k": ([2048], [2048], 4, 2, 128, 128, 2, True, 1.0, 11),
    "d128-c128-k8-causal-2k": ([2048], [2048], 2, 2, 128, 128, 8, True, 1.0, 12),
    "d64-c64-k16-causal-2k": ([2048], [2048], 4, 4, 64, 64, 16, True, 1.0, 13),
    "d128-c128-k16-causal-2k": ([2048], [2048], 2, 1, 128, 128, 16, True, 1.0, 14),
    "d128-c64-k16-gqa4": ([1024, 300], [1024, 300], 4, 1, 128, 64, 16, True, 1.0, 15),
    "d128-c128-k8-noncausal": ([900, 600], [900, 600], 2, 2, 128, 128, 8, False, 1.0, 16),
    "d64-c64-k16-noncausal": ([1500], [1500], 2, 1, 64, 64, 16, False, 1.0, 17),
    "d128-c64-k8-peaky": ([1500], [1500], 2, 2, 128, 64, 8, True, 4.0, 18),
    "d64-c128-k8-peaky-noncausal": ([1200], [1200], 2, 2, 64, 128, 8, False, 4.0, 19),
    "d64-c64-k32-noncausal": ([512], [2048], 2, 1, 64, 64, 32, False, 1.0, 20),
    "d128-c64-k64-causal-sq<sk": ([256], [4096], 2, 1, 128, 64, 64, True, 1.0, 21),
}


def _report(cases, seeds):
    import time

    worst = {}
    for dt in DTYPES:
        for name, case in cases.items():
            for seed in seeds:
                t0 = time.time()
                m = measure(case[:-1] + (case[-1] + 100 * seed,), dt)
                line = f"{dt} {name:28s} seed {seed} b={m['b']:.2e} max|dq|={m['ref_max']:.2f}"
                for v in ("c32", "c16"):
                    ok = meets_rule(m, v) and meets_rule(m, v, "g_")
                    ratios = (m[v] / m["b"], m[v + "_sum"] / m["b"], m[v + "_full"] / max(m["b_full"], 1e-30),
                              m["g_" + v] / max(m["g_b"], 1e-30))
                    line += (f" | {v}/b={ratios[0]:.3f} sum {ratios[1]:.3f} full rows {ratios[2]:.3f}"
                             f" gpu-ref {ratios[3]:.3f}") + ("" if ok else " FAIL")
                    w = worst.setdefault((dt, v), [0.0, 0.0, 0.0, 0.0, True])
                    w[:4] = [max(a, x) for a, x in zip(w[:4], ratios)]
                    w[4] = w[4] and ok
                print(line + f" ({time.time() - t0:.1f} s)", flush=True)
    for (dt, v), (r, rs, rf, rg, ok) in worst.items():
        print(f"worst {dt} {v}: {r:.3f} (before the final rounding {rs:.3f}, full rows {rf:.3f},"
              f" vs the GPU tests' reference {rg:.3f}), rule met everywhere: {ok}")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if "--study" in sys.argv:
        _report(STUDY, seeds=(0, 1))
    else:
        _report(CASES, seeds=(0,))
