"""linear_dpo_loss in one pass on the chunked PyTorch path: three products instead of four.

The generic op must recompute the logits in its backward, because its upstream
gradient is unknown while it scores. The loss knows more: every token of a
sequence shares one upstream scalar g_s, and for the margin losses with
reverse KL the rejected sequence's scalar is tied to the chosen one,
g_r = -kappa * g_c (kappa = 1, or Lc / Lr for the length-normalized ipo,
sigmoid_norm and simpo). So while a pair is scored, chunk by chunk,
    A  += R_c - kappa R_r,   R_s = sum_{t in s} alpha (onehot_t k_y - p_t k)^T h_t   # [V, D]
    dh_t = alpha (k_y w_y - (M @ W)_t)                     (unscaled, into dh)
and once the pair's log-probs give g_c: dW += g_c A, dh rows *= g_c or g_r.
Each chunk costs the logit product and the two gradient products; nothing is
recomputed. Extra memory: A (one [V, D] fp32 buffer) and a chunk buffer half
the generic size, so the total stays within the generic path's budget + [V, D].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import _chunked, _pair_loss
from ._params import LogpsParams
from .logps import _scored

TIED = ("sigmoid", "hinge", "exo_pair", "robust", "discopop")     # g_r = -g_c
LENGTH_TIED = ("ipo", "sigmoid_norm", "simpo")                    # g_r = -(Lc / Lr) g_c


def tie(loss_types, f_divergence_type) -> Optional[str]:
    """'tied' or 'length' when every loss in the list ties g_r to g_c the same way, else None."""
    if f_divergence_type != "reverse_kl":
        return None
    if set(loss_types) <= set(TIED):
        return "tied"
    if set(loss_types) <= set(LENGTH_TIED):
        return "length"
    return None


class FusedLinearDPO(torch.autograd.Function):
    """(hidden [2B, T, D], weight, bias, labels, ref_c, ref_r) -> (loss, pc, pr); gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_c, ref_r, lp: LogpsParams, dp, tie_kind: str):
        B2, T, D = hidden.shape
        B, V = B2 // 2, weight.shape[0]
        cdt = _chunked.compute_dtype(hidden.dtype)
        h = hidden.reshape(B2 * T, D)
        w_c, b_c = weight.to(cdt), None if bias is None else bias.to(cdt)
        _, rows, y, counts = _scored(labels, lp.ignore_index)
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh = torch.zeros(B2 * T, D, dtype=cdt, device=h.device) if need_dh else None
        dw = torch.zeros(V, D, dtype=cdt, device=h.device) if need_dw else None
        db = torch.zeros(V, dtype=cdt, device=h.device) if need_db else None
        acc_w = torch.empty_like(dw) if need_dw else None
        acc_b = torch.empty_like(db) if need_db else None
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        n_tok = counts.tolist()
        lengths = counts.to(cdt).clamp(min=1)
        logps = torch.zeros(B2, dtype=cdt, device=h.device)
        loss = torch.zeros((), dtype=cdt, device=h.device)
        nbuf = 1 if lp.softcap is None else 2
        budget = _chunked.CHUNK_BYTES // 2
        bufs = _chunked._Chunks(max(n_tok), V, cdt, h.device, count=nbuf, budget=budget).bufs
        for i in range(B):
            kappa = 1.0 if tie_kind == "tied" else (lengths[i] / lengths[B + i]).item()
            for buf in (acc_w, acc_b):
                if buf is not None:
                    buf.zero_()
            for s, sign in ((i, 1.0), (B + i, -kappa)):
                seq = slice(starts[s], starts[s] + n_tok[s])
                idx, ys = rows[seq], y[seq]
                chunks = _chunked._Chunks(idx.numel(), V, cdt, h.device, count=nbuf, bufs=bufs, budget=budget)
                for sl, (z, *k_buf) in chunks:
                    r, yc = idx[sl], ys[sl]
                    hc = h.index_select(0, r).to(cdt)                                    # [c, D]
                    z = _chunked._linear_logits(z, hc, w_c, b_c, lp)                     # [c, V]
                    k_y = None
                    if lp.softcap is not None:
                        k = _chunked._softcap_slope(z, lp, k_buf[0])
                        k_y = k.gather(1, yc[:, None])
                    logp, _ = _chunked._logp_and_lse_(z, yc)          # z now holds log_softmax
                    logps[s] += logp.sum()
                    m = z.exp_()                                      # p
                    if k_y is not None:
                        m.mul_(k)                                     # M = p * k
                    ga = torch.full((r.numel(), 1), lp.alpha, dtype=cdt, device=h.device)
                    _chunked.accumulate_chunk(m, k_y, hc, w_c, yc, r, ga, ga * sign, dh, acc_w, acc_b)
            # the pair is scored: its loss, and g_c = d loss / d pc (g_r = -kappa g_c)
            g_c = torch.zeros((), dtype=cdt, device=h.device)
            for name, weight_k in zip(dp.loss_types, dp.loss_weights):
                per, dc, _ = _pair_loss.pair_loss(
                    logps[i:i + 1], logps[B + i:B + i + 1],
                    None if ref_c is None else ref_c[i:i + 1].to(cdt),
                    None if ref_r is None else ref_r[i:i + 1].to(cdt),
                    lengths[i:i + 1], lengths[B + i:B + i + 1], loss_type=name, **dp.pair_kwargs())
                loss += weight_k / B * per.sum()
                g_c += weight_k / B * dc.sum()
            g = g_c.item()
            if need_dw:
                dw.add_(acc_w, alpha=g)
            if need_db:
                db.add_(acc_b, alpha=g)
            if need_dh:
                for s, scale in ((i, g), (B + i, -kappa * g)):
                    r = rows[starts[s]:starts[s] + n_tok[s]]
                    dh.index_copy_(0, r, dh.index_select(0, r).mul_(scale))
        ctx.grads = (None if dh is None else dh.view(B2, T, D).to(hidden.dtype),
                     None if dw is None else dw.to(weight.dtype),
                     None if db is None else db.to(bias.dtype))
        pc, pr = logps.chunk(2)
        ctx.mark_non_differentiable(pc, pr)
        return loss.to(torch.float64 if cdt == torch.float64 else torch.float32), pc, pr

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _pc, _pr):
        grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None, None, None, None)
