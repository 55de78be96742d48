"""Log-softmax + target gather from logits a loop already holds, forward and backward.

Forward, per block of valid rows: online logsumexp over BLOCK_V tiles of the
transformed logits z, target z_y; the launcher forms logp = z_y - lse. Backward writes
dx = g * alpha * (onehot - softmax) * k straight into the one gradient buffer
(zero in ignored rows): no second [M, V] tensor is allocated.
Both kernels also fold a slice of columns [v_lo, v_lo + V) of a wider vocabulary, with
a bias: the tiles forward and the one-pass loss (``tiles.py``) hold raw fp32 logits
h . w (bias not added) and use them so.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tile import online_lse_step, rtne_bf16, softcap_slope, transform
from .config import logits_blocks, upcast_dot


@triton.jit
def _z(x_ptr, bias_ptr, rows, mask_n, offs_v, mask_v, stride_x, scale, softcap, inv_temp,
       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Transformed logits z [BLOCK_N, BLOCK_V] (fp32) of the columns offs_v of the rows."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs_v[None, :],
                mask=mask_n[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return transform(x, scale, softcap, inv_temp, HAS_SOFTCAP)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
})
@triton.jit
def _logits_logps_fwd_kernel(x_ptr, bias_ptr, rows_ptr, y_ptr, lse_ptr, zy_ptr, N, V, stride_x, v_lo,
                             scale, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """lse and z_y of the rows x[rows] over their V columns (vocabulary ids v_lo + column; z_y = 0
    when the target is outside them)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=0) - v_lo
    y = tl.where((y >= 0) & (y < V), y, -1)         # a target beyond these columns matches none of them
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _z(x_ptr, bias_ptr, rows, mask_n, offs_v, mask_v, stride_x, scale, softcap, inv_temp,
               HAS_BIAS, HAS_SOFTCAP)
        m, s, z_y = online_lse_step(m, s, z_y, tl.where(mask_v[None, :], z, float("-inf")), offs_v, y)
    tl.store(lse_ptr + offs_n, m + tl.log(s), mask=mask_n)
    tl.store(zy_ptr + offs_n, z_y, mask=mask_n)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
})
@triton.jit
def _logits_logps_bwd_kernel(x_ptr, bias_ptr, y_ptr, lse_ptr, g_ptr, dx_ptr, M, V, stride_x, stride_dx, v_lo,
                             ignore_index, scale, softcap, inv_temp, HAS_BIAS: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, ROUND_BF16: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Over all M rows (lse, g indexed by row); ignored rows get exact zeros."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < M
    rows = offs_n.to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index)
    scored = mask_n & (y != ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * (scale * inv_temp)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _z(x_ptr, bias_ptr, rows, mask_n, offs_v, mask_v, stride_x, scale, softcap, inv_temp,
               HAS_BIAS, HAS_SOFTCAP)
        # d logp / d x = alpha * (onehot - softmax) * k, formed in fp32
        dz = tl.where(offs_v[None, :] + v_lo == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
        if HAS_SOFTCAP:
            dz = dz * softcap_slope(z, softcap, inv_temp)
        dx = tl.where(scored[:, None], dz * g[:, None], 0.0)
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest
            dx = rtne_bf16(dx)
        tl.store(dx_ptr + rows[:, None] * stride_dx + offs_v[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])


def fold_fwd(x, bias, rows, y, lse, z_y, *, v_lo=0, scale=1.0, softcap=None, temperature=1.0):
    """x [M, V] logits (unit column stride; vocabulary ids v_lo + column), bias [V] | None, rows/y [N]
    -> lse [N] and z_y [N] (fp32, written in place) of the rows x[rows]."""
    assert x.dim() == 2 and x.stride(1) == 1
    N, V = rows.numel(), x.shape[1]
    if N == 0:
        return
    cfg = logits_blocks()
    _logits_logps_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
        x, bias, rows, y, lse, z_y, N, V, x.stride(0), v_lo, float(scale), float(softcap or 0.0),
        1.0 / temperature, BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )


def fold_bwd(x, bias, labels, lse, g, dx, *, v_lo=0, ignore_index=-100, scale=1.0, softcap=None, temperature=1.0):
    """dx [M, V] (written) = g * d logp / d x for the logits x [M, V] (vocabulary ids v_lo + column),
    labels/lse/g [M] per row; rows whose label is ignore_index get zeros."""
    assert x.dim() == 2 and x.stride(1) == 1 and dx.stride(1) == 1
    M, V = x.shape
    cfg = logits_blocks()
    _logits_logps_bwd_kernel[(triton.cdiv(M, cfg.BLOCK_N),)](
        x, bias, labels, lse, g, dx, M, V, x.stride(0), dx.stride(0), v_lo, ignore_index,
        float(scale), float(softcap or 0.0), 1.0 / temperature, ROUND_BF16=upcast_dot(dx.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )


def logits_logps_fwd(x, rows, y, *, scale=1.0, softcap=None, temperature=1.0):
    """x [M, V] (unit column stride), rows/y [N] -> (logp [N], lse [N]) fp32 for the rows x[rows]."""
    lse, z_y = torch.empty(2, rows.numel(), dtype=torch.float32, device=x.device)
    fold_fwd(x, None, rows, y, lse, z_y, scale=scale, softcap=softcap, temperature=temperature)
    return z_y - lse, lse


def logits_logps_bwd(x, labels, lse, g, *, ignore_index, scale=1.0, softcap=None, temperature=1.0):
    """x [M, V], labels/lse/g [M] (lse and g per row, any value in ignored rows) -> dx [M, V] in x.dtype."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    fold_bwd(x, None, labels, lse, g, dx, ignore_index=ignore_index, scale=scale, softcap=softcap,
             temperature=temperature)
    return dx
