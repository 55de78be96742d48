"""The chunked PyTorch path: same semantics as the Triton kernels, no [N, V] tensor.

Valid tokens are processed ``rows`` at a time; one ``[rows, V]`` buffer is
reused for every chunk, so extra memory is O(rows * V + V * D) whatever the
sequence length. Everything runs in float32 (float64 for float64 input).

Notation (shared with ``kernels/``): logit l = h.w + b, transformed logit
z = f(l), p = softmax(z), logp = z_y - lse(z), and for the backward
    d logp / d l_v = alpha * (onehot_v - p_v) * k_v,
with alpha = logit_scale / temperature and k = 1 - tanh^2 (k = 1 without softcap).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._params import LogpsParams

CHUNK_BYTES = 128 << 20  # [rows, V] fp32 buffers of a chunk, all together: large GEMMs, bounded footprint


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, vocab: int, itemsize: int, count: int, budget: int) -> int:
    return max(1, min(n, budget // (vocab * itemsize * count)))


def _transform_(z: torch.Tensor, p: LogpsParams) -> torch.Tensor:
    """In place: l -> z = softcap * tanh(l * scale / softcap) / temperature."""
    if p.softcap is None:
        if p.alpha != 1.0:
            z.mul_(p.alpha)
    else:
        z.mul_(p.logit_scale / p.softcap).tanh_().mul_(p.softcap / p.temperature)
    return z


def _softcap_slope(z: torch.Tensor, p: LogpsParams, out: torch.Tensor) -> torch.Tensor:
    """k = dz/dl / alpha = 1 - tanh^2, with tanh = z * temperature / softcap."""
    return torch.mul(z, p.temperature / p.softcap, out=out).square_().neg_().add_(1.0)


def _rowwise_(op, z: torch.Tensor) -> torch.Tensor:
    """z = op(z) along rows, in place where the kernel allows it (CPU: row by row, in cache)."""
    if z.device.type == "cpu":
        return op(z, 1, False, out=z)
    return z.copy_(op(z, 1, False))


def _logp_and_lse_(z: torch.Tensor, y: torch.Tensor):
    """(logp [c], lse [c]) of the rows of z [c, V]; leaves log_softmax(z) in z.

    One fused row-wise log-softmax (max, sum of exp and write, each row still
    in cache) instead of separate passes over the whole chunk."""
    z_y = z.gather(1, y[:, None]).squeeze(1)
    logp = _rowwise_(torch._log_softmax, z).gather(1, y[:, None]).squeeze(1)
    return logp, z_y - logp


class _Chunks:
    """Valid-token chunks sharing reusable [rows, V] buffers (``bufs`` may come from the forward)."""

    def __init__(self, n: int, vocab: int, dtype: torch.dtype, device, count: int = 1, bufs=None, budget=None):
        self.n = n
        self.rows = _chunk_rows(n, vocab, torch.finfo(dtype).bits // 8, count, budget or CHUNK_BYTES)
        self.bufs = bufs or [torch.empty(self.rows, vocab, dtype=dtype, device=device) for _ in range(count)]

    def __iter__(self):
        return self._chunks(range(0, self.n, self.rows))

    def reversed(self):
        return self._chunks(reversed(range(0, self.n, self.rows)))

    def _chunks(self, starts):
        for s in starts:
            e = min(s + self.rows, self.n)
            yield slice(s, e), [b[: e - s] for b in self.bufs]


class Tail(NamedTuple):
    """The forward's last chunk, kept for the backward: its rows and log_softmax(z) in the chunk buffer.

    The backward starts with that chunk and skips its recompute (one [rows, V]
    buffer, which the backward needs anyway, lives from forward to backward)."""
    rows: slice
    buf: torch.Tensor


def _gather_rows_(buf, x, rows) -> torch.Tensor:
    """buf = x[rows] (in buf's dtype) without a second [c, V] temporary when the dtypes agree."""
    if x.dtype == buf.dtype:
        return torch.index_select(x, 0, rows, out=buf)
    return buf.copy_(x.index_select(0, rows))


def _linear_logits(buf, hc, w, bias, p: LogpsParams) -> torch.Tensor:
    torch.mm(hc, w.t(), out=buf)                                          # [c, V]
    if bias is not None:
        buf.add_(bias)
    return _transform_(buf, p)


def accumulate_chunk(m, k_y, hc, w_c, yc, rows, ga_h, ga_w, dh, dw, db):
    """Add one chunk's gradient terms, M = softmax * k [c, V], scaled per token (ga_* [c, 1]):

    2. dh_t = ga_h (k_y w_y - (M @ W)_t)        written to rows of dh      # [c, D]
    3. dW  += scatter_y(ga_w k_y h) - M^T @ (ga_w h)                        # [V, D]
    4. db  += scatter_y(ga_w k_y)   - M^T @ ga_w                            # [V]
    (k_y None: no softcap, k = 1.) Any of dh, dw, db may be None.
    """
    gy = ga_w if k_y is None else ga_w * k_y
    if dh is not None:
        w_y = w_c.index_select(0, yc)                                      # [c, D]
        if k_y is not None:
            w_y.mul_(k_y)
        dh.index_copy_(0, rows, w_y.sub_(torch.mm(m, w_c)).mul_(ga_h).to(dh.dtype))
    if dw is not None:
        dw.addmm_(m.t(), hc * ga_w, alpha=-1.0)
        dw.index_add_(0, yc, hc * gy)
    if db is not None:
        db.addmv_(m.t(), ga_w.squeeze(1), alpha=-1.0)
        db.index_add_(0, yc, gy.squeeze(1))


def linear_fwd(h, w, bias, idx, y, p: LogpsParams, keep_tail: bool = False):
    """h [M, D], w [V, D], idx/y [N] -> (logp [N], lse [N], Tail | None) for the rows h[idx].

    keep_tail: return the last chunk's log-softmax for ``linear_bwd`` (not with softcap)."""
    cdt = compute_dtype(h.dtype)
    w_c, b_c = w.to(cdt), None if bias is None else bias.to(cdt)
    n = idx.numel()
    logp = torch.empty(n, dtype=cdt, device=h.device)
    lse = torch.empty(n, dtype=cdt, device=h.device)
    chunks = _Chunks(n, w.shape[0], cdt, h.device)
    sl = None
    for sl, (buf,) in chunks:
        z = _linear_logits(buf, h.index_select(0, idx[sl]).to(cdt), w_c, b_c, p)
        logp[sl], lse[sl] = _logp_and_lse_(z, y[sl])
    tail = Tail(sl, chunks.bufs[0]) if keep_tail and sl is not None and p.softcap is None else None
    return logp, lse, tail


def linear_bwd(h, w, bias, idx, y, g, p: LogpsParams, need_dh, need_dw, need_db, tail: Optional[Tail] = None):
    """Gradients of sum_t g_t * logp_t: (dh [M, D] or None, dw [V, D] or None, db [V] or None).

    1. recompute z and M = softmax(z) * k for the chunk           # [c, V]
       (the row-wise softmax recomputes each row's lse in cache: no saved lse needed)
    2.-4. ``accumulate_chunk`` with ga = alpha * g_t
    """
    cdt = compute_dtype(h.dtype)
    w_c, b_c = w.to(cdt), None if bias is None else bias.to(cdt)
    V = w.shape[0]
    dh = torch.zeros_like(h) if need_dh else None
    dw = torch.zeros(V, w.shape[1], dtype=cdt, device=w.device) if need_dw else None
    db = torch.zeros(V, dtype=cdt, device=w.device) if need_db else None
    nbuf = 1 if p.softcap is None else 2
    chunks = _Chunks(idx.numel(), V, cdt, h.device, count=nbuf, bufs=None if tail is None else [tail.buf])
    for sl, bufs in chunks.reversed():
        rows, yc = idx[sl], y[sl]
        hc = h.index_select(0, rows).to(cdt)                               # [c, D]
        k_y = None
        if tail is not None and sl == tail.rows:
            m = bufs[0].exp_()                                             # p = exp(log_softmax), kept
        else:
            z = _linear_logits(bufs[0], hc, w_c, b_c, p)                   # [c, V]
            if p.softcap is not None:
                k = _softcap_slope(z, p, bufs[1])
                k_y = k.gather(1, yc[:, None])                             # [c, 1]
            m = _rowwise_(torch._softmax, z)                               # p = softmax(z)
        if k_y is not None:
            m.mul_(k)                                                      # M = p * k
        ga = (g[sl] * p.alpha)[:, None]                                    # [c, 1]
        accumulate_chunk(m, k_y, hc, w_c, yc, rows, ga, ga, dh, dw, db)
    return (dh,
            None if dw is None else dw.to(w.dtype),
            None if db is None else db.to(bias.dtype))


def logits_fwd(x, idx, y, p: LogpsParams):
    """x [M, V] logits -> (logp [N], lse [N]) for the rows x[idx]."""
    cdt = compute_dtype(x.dtype)
    n = idx.numel()
    logp = torch.empty(n, dtype=cdt, device=x.device)
    lse = torch.empty(n, dtype=cdt, device=x.device)
    for sl, (buf,) in _Chunks(n, x.shape[1], cdt, x.device):
        _gather_rows_(buf, x, idx[sl])
        logp[sl], lse[sl] = _logp_and_lse_(_transform_(buf, p), y[sl])
    return logp, lse


def logits_bwd(x, idx, y, g, p: LogpsParams):
    """d(sum_t g_t logp_t)/dx: the one [M, V] gradient buffer, rows not in idx zero."""
    cdt = compute_dtype(x.dtype)
    dx = torch.zeros_like(x)
    nbuf = 1 if p.softcap is None else 2
    for sl, bufs in _Chunks(idx.numel(), x.shape[1], cdt, x.device, count=nbuf):
        z = _transform_(_gather_rows_(bufs[0], x, idx[sl]), p)
        ga = (g[sl] * p.alpha)[:, None]
        if p.softcap is not None:
            k = _softcap_slope(z, p, bufs[1])
            ga_y = ga * k.gather(1, y[sl, None])
        else:
            ga_y = ga
        _rowwise_(torch._softmax, z)
        if p.softcap is not None:
            z.mul_(k)
        z.mul_(-ga).scatter_add_(1, y[sl, None], ga_y)                    # alpha g (onehot k_y - p k)
        dx.index_copy_(0, idx[sl], z.to(x.dtype))
    return dx


# ------------------------------------------------ the one pass's chunks of whole pairs (``_fused_loss._pairs_pass``)

def pair_rows(vocab: int, dtype: torch.dtype, softcap) -> int:
    """Scored tokens per chunk of whole pairs: their [tokens, V] buffers (with softcap: two) fit CHUNK_BYTES."""
    return CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8 * (1 if softcap is None else 2))


def chunk_logits(h, w, bias, rows, y, x, p: LogpsParams):
    """x [n, V] (written) = log_softmax(z) of the scored tokens h[rows]; returns (hc = h[rows] [n, D], logp, lse)."""
    hc = h.index_select(0, rows).to(x.dtype)
    logp, lse = _logp_and_lse_(_linear_logits(x, hc, w, bias, p), y)
    return hc, logp, lse


def chunk_grads(x, hc, w, y, lse, g, p: LogpsParams, *, dh, dw, db):
    """Gradients of sum_t g_t logp_t for the chunk whose log-softmax ``chunk_logits`` left in x (overwritten):
    dL = alpha g (onehot k_y - p k) [n, V]; dh [n, D] written, dw [V, D] and db [V] added to; any may be None."""
    ga = (g * p.alpha)[:, None]                                            # [n, 1]
    if p.softcap is None:
        gy, m = ga, x.exp_()                                               # p
    else:
        z = x + lse[:, None]                                               # z = log_softmax + lse
        k = _softcap_slope(z, p, out=z)
        gy, m = ga * k.gather(1, y[:, None]), x.exp_().mul_(k)             # M = p * k
    dl = m.mul_(-ga).scatter_add_(1, y[:, None], gy)
    if dh is not None:
        torch.mm(dl, w, out=dh)
    if dw is not None:
        dw.addmm_(dl.t(), hc)
    if db is not None:
        db.add_(dl.sum(0))
