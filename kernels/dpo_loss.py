"""Per-pair DPO-family losses and their gradients, one program per BLOCK pairs.

For pair i with policy log-probs (pc, pr), reference (rc, rr) and lengths (Lc, Lr):
  c = pc - rc, r = pr - rr                      (log-ratios; SimPO uses pc, pr)
  cs = f(c), rs = f(r)                           (f-divergence score, f' its slope)
  loss_i = l(cs, rs, ...)  and  dl/dpc_i, dl/dpr_i (= -dl/drc_i, -dl/drr_i)
Every term goes through the stable log-sigmoid logsig(x) = min(x, 0) - log1p(exp(-|x|))
and sig(x) = exp(logsig(x)), so |beta * margin| up to 1e4 gives finite losses and gradients.
The loss ids are LOSS_IDS below; FDIV: 0 reverse_kl, 1 forward_kl, 2 js_divergence, 3 alpha_divergence.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOSS_IDS = {name: i for i, name in enumerate((
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "discopop", "sigmoid_norm", "simpo"))}
FDIV_IDS = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2, "alpha_divergence": 3}


@triton.jit
def _logsig(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sig(x):
    return tl.exp(_logsig(x))


@triton.jit
def _score(x, alpha, FDIV: tl.constexpr):
    """(f(x), f'(x)) of a log-ratio x."""
    if FDIV == 1:
        e = tl.exp(-x)
        return 1.0 - e, e
    elif FDIV == 2:
        return 0.6931471805599453 + _logsig(x), _sig(-x)
    elif FDIV == 3:
        t = (alpha - 1.0) * x
        e = tl.exp(tl.minimum(t, 80.0))
        return (e - 1.0) / (alpha - 1.0), tl.where(t < 80.0, e, 0.0)
    else:
        return x, tl.full(x.shape, 1.0, tl.float32)


@triton.heuristics({
    "HAS_REF": lambda a: a["rc_ptr"] is not None,
    "HAS_LEN": lambda a: a["lc_ptr"] is not None,
})
@triton.jit
def _dpo_loss_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, loss_ptr, dc_ptr, dr_ptr, B,
                     beta, ls, gamma, tau, alpha, LOSS: tl.constexpr, FDIV: tl.constexpr,
                     HAS_REF: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    pc = tl.load(pc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = pc
    r = pr
    if HAS_REF:
        c = pc - tl.load(rc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = pr - tl.load(rr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv_lc = tl.full((BLOCK,), 1.0, tl.float32)
    inv_lr = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_LEN:
        inv_lc = 1.0 / tl.maximum(tl.load(lc_ptr + offs, mask=mask, other=1.0).to(tl.float32), 1.0)
        inv_lr = 1.0 / tl.maximum(tl.load(lr_ptr + offs, mask=mask, other=1.0).to(tl.float32), 1.0)
    cs, fc = _score(c, alpha, FDIV)
    rs, fr = _score(r, alpha, FDIV)
    x = beta * (cs - rs)                      # the margin of the difference-based losses
    # Each branch: loss, dl/dc, dl/dr (derivatives w.r.t. the raw log-ratios, f' applied)
    if LOSS == 0:    # sigmoid: -logsig(x)
        loss = -_logsig(x)
        gx = -beta * _sig(-x)
        dc, dr = gx * fc, -gx * fr
    elif LOSS == 1:  # hinge: relu(1 - x)
        loss = tl.maximum(1.0 - x, 0.0)
        gx = tl.where(1.0 - x > 0.0, -beta, 0.0)
        dc, dr = gx * fc, -gx * fr
    elif LOSS == 2:  # ipo: (cs/Lc - rs/Lr - 1/(2 beta))^2
        e = cs * inv_lc - rs * inv_lr - 0.5 / beta
        loss = e * e
        dc, dr = 2.0 * e * inv_lc * fc, -2.0 * e * inv_lr * fr
    elif LOSS == 3:  # exo_pair: sig(x)(logsig(x) - log(1-eps)) + sig(-x)(logsig(-x) - log eps)
        sp, sm = _sig(x), _sig(-x)
        lp, lm = _logsig(x), _logsig(-x)
        loss = sp * (lp - tl.log(1.0 - ls)) + sm * (lm - tl.log(ls))
        gx = beta * sp * sm * (x - tl.log((1.0 - ls) / ls))
        dc, dr = gx * fc, -gx * fr
    elif LOSS == 4:  # nca_pair: -logsig(bc) - logsig(-bc)/2 - logsig(-br)/2
        bc, br = beta * c, beta * r
        loss = -_logsig(bc) - 0.5 * _logsig(-bc) - 0.5 * _logsig(-br)
        dc, dr = beta * (0.5 * _sig(bc) - _sig(-bc)), 0.5 * beta * _sig(br)
    elif LOSS == 5:  # robust: (-(1-eps) logsig(x) + eps logsig(-x)) / (1 - 2 eps)
        loss = (-(1.0 - ls) * _logsig(x) + ls * _logsig(-x)) / (1.0 - 2.0 * ls)
        gx = beta * (-(1.0 - ls) * _sig(-x) - ls * _sig(x)) / (1.0 - 2.0 * ls)
        dc, dr = gx * fc, -gx * fr
    elif LOSS == 6:  # bco_pair: -logsig(bc) - logsig(-br)
        bc, br = beta * c, beta * r
        loss = -_logsig(bc) - _logsig(-br)
        dc, dr = -beta * _sig(-bc), beta * _sig(br)
    elif LOSS == 7:  # sppo_hard: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
        ec, er = c - 0.5 / beta, r + 0.5 / beta
        loss = ec * ec + er * er
        dc, dr = 2.0 * ec, 2.0 * er
    elif LOSS == 8:  # apo_zero: 1 - sig(bc) + sig(br)
        bc, br = beta * c, beta * r
        loss = 1.0 - _sig(bc) + _sig(br)
        dc, dr = -beta * _sig(bc) * _sig(-bc), beta * _sig(br) * _sig(-br)
    elif LOSS == 9:  # apo_down: sig(bc) + 1 - sig(b(c - r))
        bc, u = beta * c, beta * (c - r)
        su = beta * _sig(u) * _sig(-u)
        loss = _sig(bc) + 1.0 - _sig(u)
        dc, dr = beta * _sig(bc) * _sig(-bc) - su, su
    elif LOSS == 10:  # discopop: -logsig(x)(1 - m) + exp(-x) m, m = sig(x / tau)
        lm = _logsig(x / tau)                  # log m; exp(-x) m = exp(-x + log m), no overflow
        m = tl.exp(lm)
        em = tl.exp(-x + lm)
        dm = m * _sig(-x / tau) / tau          # dm/dx
        loss = -_logsig(x) * (1.0 - m) + em
        gx = beta * (-_sig(-x) * (1.0 - m) + _logsig(x) * dm - em + tl.exp(-x + lm + _logsig(-x / tau)) / tau)
        dc, dr = gx * fc, -gx * fr
    elif LOSS == 11:  # sigmoid_norm: -logsig(beta (cs/Lc - rs/Lr))
        xn = beta * (cs * inv_lc - rs * inv_lr)
        loss = -_logsig(xn)
        gx = -beta * _sig(-xn)
        dc, dr = gx * inv_lc * fc, -gx * inv_lr * fr
    else:            # simpo: -(1-eps) logsig(xs) - eps logsig(-xs), xs = beta (pc/Lc - pr/Lr) - gamma
        xs = beta * (pc * inv_lc - pr * inv_lr) - gamma
        loss = -(1.0 - ls) * _logsig(xs) - ls * _logsig(-xs)
        gx = beta * (-(1.0 - ls) * _sig(-xs) + ls * _sig(xs))
        dc, dr = gx * inv_lc, -gx * inv_lr
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(dc_ptr + offs, dc, mask=mask)
    tl.store(dr_ptr + offs, dr, mask=mask)


def dpo_pair_loss(pc, pr, rc, rr, lc, lr, *, loss_type, f_divergence_type, beta, label_smoothing, gamma,
                  discopop_tau, f_alpha_divergence_coef):
    """[B] float32 inputs (rc/rr, lc/lr may be None) -> (loss [B], dloss/dpc [B], dloss/dpr [B])."""
    B = pc.numel()
    loss, dc, dr = (torch.empty(B, dtype=torch.float32, device=pc.device) for _ in range(3))
    BLOCK = min(1024, triton.next_power_of_2(max(B, 16)))
    _dpo_loss_kernel[(triton.cdiv(B, BLOCK),)](
        pc, pr, rc, rr, lc, lr, loss, dc, dr, B, float(beta), float(label_smoothing), float(gamma),
        float(discopop_tau), float(f_alpha_divergence_coef), LOSS=LOSS_IDS[loss_type],
        FDIV=FDIV_IDS[f_divergence_type], BLOCK=BLOCK,
    )
    return loss, dc, dr
