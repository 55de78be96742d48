"""Per-sequence log-probabilities: autograd Functions and the public entry points.

Layering (DESIGN.md): ``kernels/`` launchers (Triton) and ``_chunked`` (PyTorch)
compute per-token values for the scored tokens only; this module flattens the
batch, picks a backend, turns token values into per-sequence sums and routes
the upstream gradients back to one scalar per token.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import _chunked, reference
from ._params import LogpsParams
from ._validate import check_labels, check_linear_inputs, check_logits, check_transform

BACKENDS = ("auto", "triton", "torch", "reference")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors Triton supports, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16, got {x.dtype}; "
                            "use backend='torch'")
        try:
            from .kernels.config import INTERPRETING
        except ImportError as e:
            raise ValueError(f"backend='triton' needs the triton package ({e}); use backend='torch'") from None
        if not (x.is_cuda or INTERPRETING):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                             f"imported); got tensors on {x.device}. Use backend='torch' or 'auto'.")
    return backend


def resolve_filter_eps(filter_eps: Union[str, float, None], dtype: torch.dtype) -> Optional[float]:
    """'auto': finfo(dtype).eps / 32 for 16-bit inputs (as CCE does), off for fp32/fp64."""
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32 if dtype in (torch.bfloat16, torch.float16) else None
    if filter_eps is None or (isinstance(filter_eps, (int, float)) and 0 <= filter_eps < 1):
        return float(filter_eps) if filter_eps else None
    raise ValueError(f"filter_eps must be 'auto', None or a number in [0, 1), got {filter_eps!r}")


def logps_params(ignore_index, logit_scale, softcap, temperature, average=False, **kw) -> LogpsParams:
    """Checked options -> LogpsParams (floats normalized)."""
    check_transform(logit_scale, softcap, temperature)
    return LogpsParams(ignore_index=ignore_index, logit_scale=float(logit_scale),
                       softcap=None if softcap is None else float(softcap), temperature=float(temperature),
                       average=average, **kw)


def _scored(labels: torch.Tensor, ignore_index: int):
    """labels [B, T] -> (flat labels [M], rows [N] of scored tokens (sorted), their labels y [N], counts [B])."""
    flat = labels.reshape(-1)
    scored = flat != ignore_index
    rows = scored.nonzero().squeeze(1)
    counts = scored.view(labels.shape).sum(1)
    return flat, rows, flat.index_select(0, rows), counts


def _per_sequence(token: torch.Tensor, rows, shape, counts, average: bool):
    """Scatter token values [N] into [B, T] (zeros elsewhere) and sum (or average) each row. Deterministic."""
    B, T = shape
    dense = torch.zeros(B * T, dtype=token.dtype, device=token.device)
    dense.index_copy_(0, rows, token)
    dense = dense.view(B, T)
    seq = dense.sum(1)
    if average:
        seq = seq / counts.clamp(min=1)
    return seq, dense


def _token_grads(grad_seq, grad_tok, rows, T: int, counts, average: bool) -> torch.Tensor:
    """One upstream scalar per scored token: d loss / d logp_t."""
    g_seq = grad_seq / counts.clamp(min=1) if average else grad_seq
    g = g_seq.index_select(0, rows // T)
    if grad_tok is not None:
        g = g + grad_tok.reshape(-1).index_select(0, rows)
    return g.contiguous()


SCATTER_ROWS = 4096


def _scatter_rows(compact: torch.Tensor, rows, like: torch.Tensor) -> torch.Tensor:
    """[N, D] (fp32) -> zeros like ``like`` [M, D] with row rows[n] = compact[n], cast a few rows at a time
    (no [N, D] copy in like's dtype at the backward's memory peak)."""
    out = torch.zeros_like(like)
    for s in range(0, rows.numel(), SCATTER_ROWS):
        out.index_copy_(0, rows[s:s + SCATTER_ROWS], compact[s:s + SCATTER_ROWS].to(out.dtype))
    return out


class LinearLogps(torch.autograd.Function):
    """(hidden [B, T, D], weight [V, D], bias [V] | None, labels) -> (seq [B], token [B, T])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LogpsParams, backend: str):
        B, T, D = hidden.shape
        h = hidden.reshape(B * T, D)
        h = h if h.stride(1) == 1 else h.contiguous()
        w = weight.contiguous()
        b = None if bias is None else bias.contiguous()
        _, rows, y, counts = _scored(labels, params.ignore_index)
        kw = dict(scale=params.logit_scale, softcap=params.softcap, temperature=params.temperature)
        if backend == "triton":
            from .kernels.logps import logps_fwd
            logp, lse = logps_fwd(h, w, b, rows, y, **kw)
        else:
            keep_tail = any(ctx.needs_input_grad[:3])
            logp, lse, ctx.tail = _chunked.linear_fwd(h, w, b, rows, y, params, keep_tail)
        ctx.save_for_backward(h, w, b, rows, y, lse, counts)
        ctx.params, ctx.backend, ctx.shape = params, backend, (B, T, D)
        return _per_sequence(logp, rows, (B, T), counts, params.average)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_seq, grad_tok):
        h, w, b, rows, y, lse, counts = ctx.saved_tensors
        p, (B, T, D) = ctx.params, ctx.shape
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        g = _token_grads(grad_seq, grad_tok, rows, T, counts, p.average).to(lse.dtype)
        if ctx.backend == "triton":
            from .kernels.logps import logps_bwd
            dh_rows, dw, db = logps_bwd(
                h, w, b, rows, y, lse, g, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                scale=p.logit_scale, softcap=p.softcap, temperature=p.temperature,
                filter_eps=p.filter_eps, deterministic=p.deterministic)
            dh = _scatter_rows(dh_rows, rows, h) if need_dh else None
            dw = None if dw is None else dw.to(w.dtype)
            db = None if db is None else db.to(b.dtype)
        else:
            tail, ctx.tail = ctx.tail, None        # consumed in place: a second backward recomputes
            dh, dw, db = _chunked.linear_bwd(h, w, b, rows, y, g, p, need_dh, need_dw, need_db, tail)
        return (None if dh is None else dh.view(B, T, D)), dw, db, None, None, None


class LogitsLogps(torch.autograd.Function):
    """(logits [B, T, V], labels) -> (seq [B], token [B, T])."""

    @staticmethod
    def forward(ctx, logits, labels, params: LogpsParams, backend: str):
        B, T, V = logits.shape
        x = logits.reshape(B * T, V)
        x = x if x.stride(1) == 1 else x.contiguous()
        flat, rows, y, counts = _scored(labels, params.ignore_index)
        if backend == "triton":
            from .kernels.logits_logps import logits_logps_fwd
            logp, lse = logits_logps_fwd(x, rows, y, scale=params.logit_scale, softcap=params.softcap,
                                         temperature=params.temperature)
        else:
            logp, lse = _chunked.logits_fwd(x, rows, y, params)
        ctx.save_for_backward(x, flat, rows, y, lse, counts)
        ctx.params, ctx.backend, ctx.shape = params, backend, (B, T, V)
        return _per_sequence(logp, rows, (B, T), counts, params.average)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_seq, grad_tok):
        x, flat, rows, y, lse, counts = ctx.saved_tensors
        p, (B, T, V) = ctx.params, ctx.shape
        g = _token_grads(grad_seq, grad_tok, rows, T, counts, p.average).to(lse.dtype)
        if ctx.backend == "triton":
            from .kernels.logits_logps import logits_logps_bwd
            M = B * T
            lse_rows = torch.zeros(M, dtype=lse.dtype, device=lse.device).index_copy_(0, rows, lse)
            g_rows = torch.zeros(M, dtype=g.dtype, device=g.device).index_copy_(0, rows, g)
            dx = logits_logps_bwd(x, flat, lse_rows, g_rows, ignore_index=p.ignore_index,
                                  scale=p.logit_scale, softcap=p.softcap, temperature=p.temperature)
        else:
            dx = _chunked.logits_bwd(x, rows, y, g, p)
        return dx.view(B, T, V), None, None, None


def _finish(seq, token, return_token_logps: bool):
    return (seq, token) if return_token_logps else seq


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100, logit_scale: float = 1.0,
                   softcap: Optional[float] = None, temperature: float = 1.0, average: bool = False,
                   return_token_logps: bool = False, backend: str = "auto",
                   filter_eps: Union[str, float, None] = "auto", deterministic: bool = False):
    """Sum (or mean, ``average=True``) of log p(label) per sequence, without materializing logits.

    hidden [B, T, D] are the LM's last hidden states (before lm_head), weight
    [V, D] the lm_head, labels [B, T] int: ``labels[b, t]`` is the token that
    ``hidden[b, t]`` predicts; positions equal to ``ignore_index`` are not
    scored (a sequence with none scored gets exactly 0). Logits are
    ``softcap * tanh((h.w + b) * logit_scale / softcap) / temperature``.

    Returns float32 ``[B]`` (float64 for float64 input), plus the per-token
    values ``[B, T]`` (zero where ignored) when ``return_token_logps=True``.
    Differentiable w.r.t. hidden, weight and bias; only the gradients that are
    required are computed.

    backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere),
    ``"triton"``, ``"torch"`` or ``"reference"`` (materializes logits).
    The Triton backward (default) writes the logits' gradient for a chunk of
    rows at a time and hands the two gradient products to matrix multiplies:
    no atomics, so it is bitwise reproducible as it is. ``FASTDPO_BWD=vocab``
    takes a slice of the vocabulary at a time instead (each weight-gradient slice
    written once, in the weight dtype; no fp32 [V, D] buffer), ``FASTDPO_FWD=tiles``
    runs the forward's product in cuBLAS tiles; both unmeasured on a GPU so far.
    ``FASTDPO_BWD=fused`` selects the one-kernel backward (no [rows, V] buffer,
    slower on the GPU), which the next two options concern:
    filter_eps: skips logit tiles where every ``|onehot - softmax| < filter_eps``.
    ``"auto"`` = ``finfo(dtype).eps / 32`` for bf16/fp16 (each skipped term is
    below the input dtype's resolution relative to the target term; many
    skipped tiles can add up to more, as in CCE), off for fp32; ``None``: off.
    deterministic: no atomics (one extra logit recompute).

    A non-finite hidden value makes the log-probs of its own sequence NaN
    (the other sequences are unaffected); gradients w.r.t. weight then carry NaN too.
    """
    check_linear_inputs(hidden, weight, bias)
    check_transform(logit_scale, softcap, temperature)
    labels = check_labels(labels, hidden.shape[:2], hidden.device, weight.shape[0], ignore_index)
    backend = resolve_backend(backend, hidden)
    if backend == "reference":
        return reference.sequence_logps(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, logit_scale=logit_scale,
            softcap=softcap, temperature=temperature, average=average, return_token_logps=return_token_logps)
    params = logps_params(ignore_index, logit_scale, softcap, temperature, average,
                          filter_eps=resolve_filter_eps(filter_eps, hidden.dtype), deterministic=deterministic)
    seq, token = LinearLogps.apply(hidden, weight, bias, labels, params, backend)
    return _finish(seq, token, return_token_logps)


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                               logit_scale: float = 1.0, softcap: Optional[float] = None,
                               temperature: float = 1.0, average: bool = False,
                               return_token_logps: bool = False, backend: str = "auto"):
    """``sequence_logps`` for loops that already hold logits [B, T, V]: log-softmax, gather and
    masked sum fused. The backward writes the logits' gradient directly (no second [B, T, V] buffer)."""
    check_logits(logits)
    check_transform(logit_scale, softcap, temperature)
    labels = check_labels(labels, logits.shape[:2], logits.device, logits.shape[2], ignore_index)
    backend = resolve_backend(backend, logits)
    if backend == "reference":
        return reference.sequence_logps_from_logits(
            logits, labels, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
            temperature=temperature, average=average, return_token_logps=return_token_logps)
    params = logps_params(ignore_index, logit_scale, softcap, temperature, average)
    seq, token = LogitsLogps.apply(logits, labels, params, backend)
    return _finish(seq, token, return_token_logps)
