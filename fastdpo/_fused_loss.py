"""linear_dpo_loss in one pass: three matrix products instead of sequence_logps' four.

The generic op must recompute the logits in its backward, because its upstream
gradient is unknown while it scores. The loss knows more: every token of a
sequence shares one upstream scalar, known as soon as its pair is scored.

Chunks of whole pairs (``pairs`` on the Triton path, ``torch_pairs`` on the chunked PyTorch one; any per-pair
loss): consecutive pairs whose scored tokens' logits [tokens, V] fit one buffer (``pair_cap``: fp32 in
ONE_PASS_BYTES for Triton, ``_chunked.CHUNK_BYTES`` on the CPU):
  1. X = H_c @ W^T and lse, logp per token          (``kernels.tiles.chunk_logits`` / ``_chunked.chunk_logits``)
  2. the pairs' log-probs, their loss and g_c, g_r   (``_pair_loss.weighted_pair_losses``)
  3. dL = alpha g (onehot k_y - p k) from X; dH_c = dL @ W, dW += dL^T @ H_c
     (Triton: a vocabulary slice of dL at a time, fp32 accumulation; PyTorch: dL in X's place)
Extra memory: X, and the [V, D] dW accumulator (fp32; fp64 for fp64 inputs) with its final cast. Three
products each as large as the chunk allows (CPU, 2 pairs of ~80 + 80 scored tokens, V 32000: 0.82x the time of
the pair-by-pair pass below, whose products have a sequence's rows at most).

Pair by pair (CPU, ``tied`` / ``length``, when a pair does not fit a chunk): for the margin losses with reverse
KL the rejected sequence's scalar is tied to the chosen one, g_r = -kappa * g_c (kappa = 1, or Lc / Lr for the
length-normalized ipo, sigmoid_norm and simpo). So while a pair is scored, chunk by chunk,
    A  += R_c - kappa R_r,   R_s = sum_{t in s} alpha (onehot_t k_y - p_t k)^T h_t   # [V, D]
    dh_t = alpha (k_y w_y - (M @ W)_t)                     (unscaled, into dh)
and once the pair's log-probs give g_c: dW += g_c A, dh rows *= g_c or g_r.
Extra memory: A (one [V, D] fp32 buffer) and a chunk buffer half the generic size; any pair length.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import _chunked, _pair_loss
from ._params import LogpsParams
from .logps import _per_sequence, _scored

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


def pair_token_counts(labels: torch.Tensor, ignore_index: int) -> list:
    """Scored tokens of each pair (chosen row i plus rejected row B + i), on the host."""
    counts = (labels != ignore_index).sum(1).tolist()
    B = len(counts) // 2
    return [counts[i] + counts[B + i] for i in range(B)]


class FusedLinearDPO(torch.autograd.Function):
    """(hidden [2B, T, D], weight, bias, labels, ref_c, ref_r) -> (loss, pc, pr); gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_c, ref_r, lp: LogpsParams, dp, kind: str, grad: bool):
        """grad: autograd records this call (grad mode was on at ``apply``); without it no gradient is formed
        (``needs_input_grad`` reflects requires_grad even under no_grad: a reference pass or an evaluation
        would pay for two products it discards). The log-probs do not depend on it."""
        one_pass = _pairs_pass if kind in ("pairs", "torch_pairs") else _tied_pass
        needs = tuple(grad and n for n in ctx.needs_input_grad[:3])
        loss, logps, (dh, dw, db) = one_pass(hidden, weight, bias, labels, ref_c, ref_r, lp, dp, kind, needs)
        ctx.grads = (None if dh is None else dh.view(hidden.shape).to(hidden.dtype),
                     None if dw is None else dw.to(weight.dtype),
                     None if db is None else db.to(bias.dtype))
        pc, pr = logps.chunk(2)
        ctx.mark_non_differentiable(pc, pr)
        return loss.to(torch.float64 if logps.dtype == torch.float64 else torch.float32), pc, pr

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _pc, _pr):
        grads = [None if g is None else g.mul_(grad.to(g.dtype)) for g in ctx.grads]   # ours: scaled in place
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None)


def _terms(dp):
    return list(zip(dp.loss_types, dp.loss_weights))


def _tied_pass(hidden, weight, bias, labels, ref_c, ref_r, lp: LogpsParams, dp, tie_kind, needs):
    """The chunked PyTorch path, pair by pair: (loss, logps [2B], (dh [2B*T, D], dw, db))."""
    B2, T, D = hidden.shape
    B, V = B2 // 2, weight.shape[0]
    cdt = _chunked.compute_dtype(hidden.dtype)
    h = hidden.reshape(B2 * T, D)
    w_c, b_c = weight.to(cdt), None if bias is None else bias.to(cdt)
    _, rows, y, counts = _scored(labels, lp.ignore_index)
    need_dh, need_dw, need_db = needs
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
                if not any(needs):
                    continue
                m = z.exp_()                                      # p
                if k_y is not None:
                    m.mul_(k)                                     # M = p * k
                ga = torch.full((r.numel(), 1), lp.alpha, dtype=cdt, device=h.device)
                _chunked.accumulate_chunk(m, k_y, hc, w_c, yc, r, ga, ga * sign, dh, acc_w, acc_b)
        # the pair is scored: its loss, and g_c = d loss / d pc (g_r = -kappa g_c)
        pair = _pair_loss.weighted_pair_losses(
            logps[i:i + 1], logps[B + i:B + i + 1],
            None if ref_c is None else ref_c[i:i + 1].to(cdt), None if ref_r is None else ref_r[i:i + 1].to(cdt),
            lengths[i:i + 1], lengths[B + i:B + i + 1], _terms(dp), dp.pair_kwargs(), B, "torch")
        loss += pair.loss
        if not any(needs):
            continue
        g = pair.dc.sum().item()
        if need_dw:
            dw.add_(acc_w, alpha=g)
        if need_db:
            db.add_(acc_b, alpha=g)
        if need_dh:
            for s, scale in ((i, g), (B + i, -kappa * g)):
                r = rows[starts[s]:starts[s] + n_tok[s]]
                dh.index_copy_(0, r, dh.index_select(0, r).mul_(scale))
    return loss, logps, (dh, dw, db)


def pair_chunks(pair_tokens: list, cap: int) -> Optional[list]:
    """[(i0, i1)]: consecutive pairs of at most ``cap`` scored tokens together, or None when a single pair has
    more (the one pass does not apply)."""
    if any(t > cap for t in pair_tokens):
        return None
    chunks, start, held = [], 0, 0
    for i, t in enumerate(pair_tokens):
        if held + t > cap:
            chunks.append((start, i))
            start, held = i, 0
        held += t
    if pair_tokens:
        chunks.append((start, len(pair_tokens)))
    return chunks


def pair_cap(kind: str, vocab: int, dtype: torch.dtype, softcap) -> int:
    """Scored tokens a chunk of whole pairs may hold: "pairs" (Triton) fp32 logits in ONE_PASS_BYTES,
    "torch_pairs" its buffers in ``_chunked.CHUNK_BYTES``."""
    if kind == "pairs":
        from .kernels.config import ONE_PASS_BYTES
        return ONE_PASS_BYTES // (4 * vocab)
    return _chunked.pair_rows(vocab, _chunked.compute_dtype(dtype), softcap)


class _TritonTiles:
    """A chunk's logits and gradients through ``kernels.tiles`` (fp32 logits, inputs in their dtype)."""

    def __init__(self, h, w, b, lp: LogpsParams):
        from .kernels import tiles
        from .kernels._matmul import fp16_unit
        self.tiles, self.fp16_unit = tiles, fp16_unit
        self.h, self.w, self.b, self.fp16 = h, w, b, h.dtype == torch.float16
        self.kw = dict(scale=lp.logit_scale, softcap=lp.softcap, temperature=lp.temperature)
        self.dtype = torch.float32

    def logits(self, rows, y, x):
        return self.tiles.chunk_logits(self.h, self.w, self.b, rows, y, x, **self.kw)

    def grads(self, x, hc, y, lse, g, dh, dw, db):
        unit = self.fp16_unit(g) if self.fp16 else None
        self.tiles.chunk_grads(x, hc, self.w, self.b, y, lse, g if unit is None else g * unit, dh=dh, dw=dw, db=db,
                               grad_scale=None if unit is None else 1.0 / unit, **self.kw)


class _TorchTiles:
    """A chunk's logits and gradients in PyTorch (``_chunked``; fp32, fp64 for fp64 inputs)."""

    def __init__(self, h, w, b, lp: LogpsParams):
        self.dtype = _chunked.compute_dtype(h.dtype)
        self.h, self.lp = h, lp
        self.w, self.b = w.to(self.dtype), None if b is None else b.to(self.dtype)

    def logits(self, rows, y, x):
        return _chunked.chunk_logits(self.h, self.w, self.b, rows, y, x, self.lp)

    def grads(self, x, hc, y, lse, g, dh, dw, db):
        _chunked.chunk_grads(x, hc, self.w, y, lse, g, self.lp, dh=dh, dw=dw, db=db)


def _pairs_pass(hidden, weight, bias, labels, ref_c, ref_r, lp: LogpsParams, dp, kind, needs):
    """A chunk of whole pairs at a time (any per-pair loss): (loss, logps [2B], (dh [2B*T, D], dw, db)).
    kind "pairs": the Triton tiles; "torch_pairs": PyTorch."""
    B2, T, D = hidden.shape
    B, V = B2 // 2, weight.shape[0]
    h = hidden.reshape(B2 * T, D)
    h = h if h.stride(1) == 1 else h.contiguous()
    ops = (_TritonTiles if kind == "pairs" else _TorchTiles)(
        h, weight.contiguous(), None if bias is None else bias.contiguous(), lp)
    _, rows, y, counts = _scored(labels, lp.ignore_index)
    need_dh, need_dw, need_db = needs
    acc = dict(dtype=ops.dtype, device=h.device)
    dh = torch.zeros_like(h) if need_dh else None
    dw = torch.zeros(V, D, **acc) if need_dw else None
    db = torch.zeros(V, **acc) if need_db else None
    n_tok = counts.tolist()
    starts = [0, *itertools.accumulate(n_tok)]                # sequence s: positions starts[s]:starts[s + 1]
    chunks = pair_chunks([n_tok[i] + n_tok[B + i] for i in range(B)], pair_cap(kind, V, h.dtype, lp.softcap))
    if chunks is None:
        raise ValueError("one pass: a pair's scored tokens exceed a chunk (see pair_cap)")
    x_flat = torch.empty(max(starts[i1] - starts[i0] + starts[B + i1] - starts[B + i0] for i0, i1 in chunks) * V,
                         **acc)
    lengths = counts.to(ops.dtype)
    logps = torch.zeros(B2, **acc)
    loss = torch.zeros((), **acc)
    for i0, i1 in chunks:
        P = i1 - i0
        # the chunk's tokens: chosen rows i0..i1-1, then rejected rows B+i0..B+i1-1 (positions in rows)
        sel = torch.cat([torch.arange(starts[i0], starts[i1], device=h.device),
                         torch.arange(starts[B + i0], starts[B + i1], device=h.device)])
        r, yc = rows[sel], y[sel]
        n = r.numel()
        x = x_flat[: n * V].view(n, V)
        hc, logp, lse = ops.logits(r, yc, x)
        # per-sequence log-probs: the chunk's rows laid out as a [2P, T] batch of their own
        local = torch.where(r < B * T, r - i0 * T, r - (B + i0) * T + P * T)
        seq_counts = torch.cat([counts[i0:i1], counts[B + i0:B + i1]])
        seq, _ = _per_sequence(logp, local, (2 * P, T), seq_counts, False)
        pair = _pair_loss.weighted_pair_losses(
            seq[:P], seq[P:], None if ref_c is None else ref_c[i0:i1].to(ops.dtype),
            None if ref_r is None else ref_r[i0:i1].to(ops.dtype), lengths[i0:i1], lengths[B + i0:B + i1],
            _terms(dp), dp.pair_kwargs(), B, "triton" if kind == "pairs" else "torch")
        loss += pair.loss
        logps[i0:i1], logps[B + i0:B + i1] = seq[:P], seq[P:]
        if not any(needs):
            continue
        g = torch.cat([pair.dc, pair.dr]).index_select(0, local // T)          # [n] per token
        dh_c = torch.empty(n, D, **acc) if need_dh else None
        ops.grads(x, hc, yc, lse, g, dh_c, dw, db)
        if need_dh:
            dh.index_copy_(0, r, dh_c.to(h.dtype))
    return loss, logps, (dh, dw, db)
