"""PyTorch twin of ``kernels/dpo_loss.py``: per-pair losses and their gradients, same formulas.

Used wherever the Triton kernel cannot run (CPU without the interpreter, float64).
See the kernel's docstring for the notation; every term uses the stable log-sigmoid.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop", "sigmoid_norm", "simpo")


def _score(x, fdiv: str, alpha: float):
    """(f(x), f'(x)) of a log-ratio x."""
    if fdiv == "forward_kl":
        e = torch.exp(-x)
        return 1 - e, e
    if fdiv == "js_divergence":
        return math.log(2) + F.logsigmoid(x), torch.sigmoid(-x)
    if fdiv == "alpha_divergence":
        t = (alpha - 1) * x
        e = torch.exp(t.clamp(max=80.0))
        return (e - 1) / (alpha - 1), torch.where(t < 80.0, e, torch.zeros_like(e))
    return x, torch.ones_like(x)


def pair_loss(pc, pr, rc, rr, lc, lr, *, loss_type, f_divergence_type, beta, label_smoothing, gamma,
              discopop_tau, f_alpha_divergence_coef):
    """[B] inputs (rc/rr, lc/lr may be None) -> (loss [B], dloss/dpc [B], dloss/dpr [B])."""
    lsig, sig, ls, b = F.logsigmoid, torch.sigmoid, label_smoothing, beta
    c = pc if rc is None else pc - rc
    r = pr if rr is None else pr - rr
    inv_lc = 1.0 if lc is None else 1.0 / lc.clamp(min=1)
    inv_lr = 1.0 if lr is None else 1.0 / lr.clamp(min=1)
    cs, fc = _score(c, f_divergence_type, f_alpha_divergence_coef)
    rs, fr = _score(r, f_divergence_type, f_alpha_divergence_coef)
    x = b * (cs - rs)
    gx = None                                   # dl/dx for the losses of the margin x alone
    if loss_type == "sigmoid":
        loss, gx = -lsig(x), -b * sig(-x)
    elif loss_type == "hinge":
        loss = torch.relu(1 - x)
        gx = torch.where(1 - x > 0, torch.full_like(x, -b), torch.zeros_like(x))
    elif loss_type == "ipo":
        e = cs * inv_lc - rs * inv_lr - 0.5 / b
        loss, dc, dr = e * e, 2 * e * inv_lc * fc, -2 * e * inv_lr * fr
    elif loss_type == "exo_pair":
        loss = sig(x) * (lsig(x) - math.log1p(-ls)) + sig(-x) * (lsig(-x) - math.log(ls))
        gx = b * sig(x) * sig(-x) * (x - math.log((1 - ls) / ls))
    elif loss_type == "nca_pair":
        bc, br = b * c, b * r
        loss = -lsig(bc) - 0.5 * lsig(-bc) - 0.5 * lsig(-br)
        dc, dr = b * (0.5 * sig(bc) - sig(-bc)), 0.5 * b * sig(br)
    elif loss_type == "robust":
        loss = (-(1 - ls) * lsig(x) + ls * lsig(-x)) / (1 - 2 * ls)
        gx = b * (-(1 - ls) * sig(-x) - ls * sig(x)) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        bc, br = b * c, b * r
        loss, dc, dr = -lsig(bc) - lsig(-br), -b * sig(-bc), b * sig(br)
    elif loss_type == "sppo_hard":
        ec, er = c - 0.5 / b, r + 0.5 / b
        loss, dc, dr = ec * ec + er * er, 2 * ec, 2 * er
    elif loss_type == "apo_zero":
        bc, br = b * c, b * r
        loss = 1 - sig(bc) + sig(br)
        dc, dr = -b * sig(bc) * sig(-bc), b * sig(br) * sig(-br)
    elif loss_type == "apo_down":
        bc, u = b * c, b * (c - r)
        su = b * sig(u) * sig(-u)
        loss = sig(bc) + 1 - sig(u)
        dc, dr = b * sig(bc) * sig(-bc) - su, su
    elif loss_type == "discopop":
        tau = discopop_tau
        lm = lsig(x / tau)                      # log m; exp(-x) m = exp(-x + log m), no overflow
        m, em = torch.exp(lm), torch.exp(-x + lm)
        loss = -lsig(x) * (1 - m) + em
        gx = b * (-sig(-x) * (1 - m) + lsig(x) * m * sig(-x / tau) / tau - em
                  + torch.exp(-x + lm + lsig(-x / tau)) / tau)
    elif loss_type == "sigmoid_norm":
        xn = b * (cs * inv_lc - rs * inv_lr)
        g = -b * sig(-xn)
        loss, dc, dr = -lsig(xn), g * inv_lc * fc, -g * inv_lr * fr
    elif loss_type == "simpo":
        xs = b * (pc * inv_lc - pr * inv_lr) - gamma
        g = b * (-(1 - ls) * sig(-xs) + ls * sig(xs))
        loss, dc, dr = -(1 - ls) * lsig(xs) - ls * lsig(-xs), g * inv_lc, -g * inv_lr
    else:
        raise ValueError(f"not a per-pair loss: {loss_type!r}")
    if gx is not None:
        dc, dr = gx * fc, -gx * fr
    return loss, dc, dr


class PairGrads(NamedTuple):
    loss: torch.Tensor   # [] the weighted terms summed over the given pairs
    dc: torch.Tensor     # [P] d loss / d policy chosen log-prob, per pair
    dr: torch.Tensor     # [P] d loss / d policy rejected log-prob
    drc: torch.Tensor    # [P] d loss / d reference chosen log-prob (-dc, except for simpo's terms)
    drr: torch.Tensor    # [P] d loss / d reference rejected log-prob


def weighted_pair_losses(pc, pr, rc, rr, lc, lr, terms, kwargs, batch: int, backend: str,
                         pair_weights=None) -> PairGrads:
    """sum_k w_k / batch * sum_i a_i loss_k(pair i) over the given pairs, and its gradients per pair.

    terms: [(loss_type, w_k)], per-pair types only; each term is a mean over a batch of ``batch``
    pairs, of which these may be a chunk. pair_weights: a_i [P], constants (WPO's weights), else 1.
    backend "triton": the Triton kernel, else ``pair_loss``."""
    if backend == "triton":
        from .kernels.dpo_loss import dpo_pair_loss as fn
    else:
        fn = pair_loss
    zero = torch.zeros_like(pc)
    loss, dc, dr, drc, drr = pc.new_zeros(()), zero, zero.clone(), zero.clone(), zero.clone()
    for name, weight in terms:
        per, c, r = fn(pc, pr, rc, rr, lc, lr, loss_type=name, **kwargs)
        if pair_weights is not None:
            per, c, r = per * pair_weights, c * pair_weights, r * pair_weights
        k = weight / batch
        loss = loss + k * per.sum()
        dc, dr = dc + k * c, dr + k * r
        if name != "simpo":               # simpo ignores the reference
            drc, drr = drc - k * c, drr - k * r
    return PairGrads(loss, dc, dr, drc, drr)
