"""A brute-force float64 MoBA oracle with dense masks, written from the SPEC alone.

Deliberately independent of moba_cute.reference: Python loops for the selection, a full
(Sq x Sk) mask and dense softmax for the attention. Only for tiny shapes.
"""

import math

import torch


def seq_bounds(cu):
    c = [int(x) for x in cu.tolist()]
    return [(c[i], c[i + 1]) for i in range(len(c) - 1)]


def oracle_selection(q, k, cu_q, cu_k, chunk_size, topk, causal):
    """Per sequence: list over queries of list over heads of the selected local chunk ids
    (own chunk first when causal, then by descending fp64 score, ties larger index first)."""
    H, Hk = q.shape[1], k.shape[1]
    G = H // Hk
    result = []
    for (qa, qb), (ka, kb) in zip(seq_bounds(cu_q), seq_bounds(cu_k)):
        Sq, Sk = qb - qa, kb - ka
        nc = (Sk + chunk_size - 1) // chunk_size
        kk = k[ka:kb].double()
        cents = [kk[j * chunk_size : min((j + 1) * chunk_size, Sk)].mean(0) for j in range(nc)]  # (Hk, D)
        rows = []
        for i in range(Sq):
            qi = q[qa + i].double()
            p = i + Sk - Sq
            heads = []
            for h in range(H):
                scores = [float(qi[h] @ cents[j][h // G]) for j in range(nc)]
                if causal:
                    if p < 0:
                        heads.append([])
                        continue
                    own = p // chunk_size
                    cand = sorted(range(own), key=lambda j: (-scores[j], -j))
                    heads.append([own] + cand[: topk - 1])
                else:
                    cand = sorted(range(nc), key=lambda j: (-scores[j], -j))
                    heads.append(cand[:topk])
            rows.append(heads)
        result.append(rows)
    return result


def oracle_scores(q, k, cu_q, cu_k, chunk_size):
    """fp64 score tensors per sequence: (Sq, H, nc)."""
    H, Hk = q.shape[1], k.shape[1]
    out = []
    for (qa, qb), (ka, kb) in zip(seq_bounds(cu_q), seq_bounds(cu_k)):
        Sk = kb - ka
        nc = (Sk + chunk_size - 1) // chunk_size
        kk = k[ka:kb].double()
        if nc == 0:
            out.append(torch.zeros(qb - qa, H, 0, dtype=torch.float64))
            continue
        cents = torch.stack([kk[j * chunk_size : min((j + 1) * chunk_size, Sk)].mean(0) for j in range(nc)])
        cents = cents.repeat_interleave(H // Hk, dim=1)  # (nc, H, D)
        out.append(torch.einsum("ihd,jhd->ihj", q[qa:qb].double(), cents))
    return out


def selection_to_lists(selection, cu_q):
    """Routing.selection -> same nested lists as oracle_selection."""
    res = []
    for qa, qb in seq_bounds(cu_q):
        rows = []
        for i in range(qa, qb):
            rows.append([[int(c) for c in selection[i, h].tolist() if c >= 0] for h in range(selection.shape[1])])
        res.append(rows)
    return res


def oracle_attention(q, k, v, cu_q, cu_k, chunk_size, sel_lists, causal, scale=None):
    """Dense masked attention in float64 (differentiable). Returns out (total_q,H,D), lse (H,total_q)."""
    H, Hk, D = q.shape[1], k.shape[1], q.shape[2]
    G = H // Hk
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(seq_bounds(cu_q), seq_bounds(cu_k))):
        Sq, Sk = qb - qa, kb - ka
        for_heads_o, for_heads_l = [], []
        for h in range(H):
            mask = torch.zeros(Sq, Sk, dtype=torch.bool)
            t = torch.arange(Sk)
            for i in range(Sq):
                p = i + Sk - Sq
                chosen = torch.tensor(sel_lists[b][i][h], dtype=torch.long)
                row = torch.isin(t // chunk_size, chosen)
                if causal:
                    row &= t <= p
                mask[i] = row
            s = (q[qa:qb, h].double() @ k[ka:kb, h // G].double().T) * scale
            s = s.masked_fill(~mask, -math.inf)
            lse = torch.logsumexp(s, -1) if Sk else torch.full((Sq,), -math.inf, dtype=torch.float64)
            empty = ~mask.any(-1)
            pr = torch.softmax(s.masked_fill(empty[:, None], 0.0), -1).masked_fill(~mask, 0.0)
            o = pr @ v[ka:kb, h // G].double() if Sk else torch.zeros(Sq, D, dtype=torch.float64)
            for_heads_o.append(o)
            for_heads_l.append(lse)
        outs.append(torch.stack(for_heads_o, 1))
        lses.append(torch.stack(for_heads_l, 0))
    return torch.cat(outs, 0), torch.cat(lses, 1)
