"""Log-softmax + target gather from logits a loop already holds, forward and backward.

Forward, per block of valid rows: online logsumexp over BLOCK_V tiles of the
transformed logits z, target z_y, logp = z_y - lse. Backward writes
dx = g * alpha * (onehot - softmax) * k straight into the one gradient buffer
(zero in ignored rows): no second [M, V] tensor is allocated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tile import online_lse_step, rtne_bf16, softcap_slope, transform
from .config import logits_blocks, upcast_dot


@triton.heuristics({"HAS_SOFTCAP": lambda a: a["softcap"] > 0})
@triton.jit
def _logits_logps_fwd_kernel(x_ptr, rows_ptr, y_ptr, logp_ptr, lse_ptr, N, V, stride_x,
                             scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_v[None, :],
                    mask=mask_n[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        z = tl.where(mask_v[None, :], transform(x, scale, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
        m, s, z_y = online_lse_step(m, s, z_y, z, offs_v, y)
    lse = m + tl.log(s)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(logp_ptr + offs_n, z_y - lse, mask=mask_n)


@triton.heuristics({"HAS_SOFTCAP": lambda a: a["softcap"] > 0})
@triton.jit
def _logits_logps_bwd_kernel(x_ptr, y_ptr, lse_ptr, g_ptr, dx_ptr, M, V, stride_x, stride_dx,
                             ignore_index, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr,
                             ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
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
        mask = mask_n[:, None] & mask_v[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        z = transform(x, scale, softcap, inv_temp, HAS_SOFTCAP)
        # d logp / d x = alpha * (onehot - softmax) * k, formed in fp32
        dz = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
        if HAS_SOFTCAP:
            dz = dz * softcap_slope(z, softcap, inv_temp)
        dx = tl.where(scored[:, None], dz * g[:, None], 0.0)
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest
            dx = rtne_bf16(dx)
        tl.store(dx_ptr + rows[:, None] * stride_dx + offs_v[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def logits_logps_fwd(x, rows, y, *, scale=1.0, softcap=None, temperature=1.0):
    """x [M, V] (unit column stride), rows/y [N] -> (logp [N], lse [N]) fp32 for the rows x[rows]."""
    assert x.dim() == 2 and x.stride(1) == 1
    N, V = rows.numel(), x.shape[1]
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return logp, lse
    cfg = logits_blocks()
    _logits_logps_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
        x, rows, y, logp, lse, N, V, x.stride(0), float(scale), float(softcap or 0.0), 1.0 / temperature,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )
    return logp, lse


def logits_logps_bwd(x, labels, lse, g, *, ignore_index, scale=1.0, softcap=None, temperature=1.0):
    """x [M, V], labels/lse/g [M] (lse and g per row, any value in ignored rows) -> dx [M, V] in x.dtype."""
    assert x.dim() == 2 and x.stride(1) == 1
    M, V = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    cfg = logits_blocks()
    _logits_logps_bwd_kernel[(triton.cdiv(M, cfg.BLOCK_N),)](
        x, labels, lse, g, dx, M, V, x.stride(0), dx.stride(0), ignore_index,
        float(scale), float(softcap or 0.0), 1.0 / temperature, ROUND_BF16=upcast_dot(x.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, num_warps=cfg.num_warps,
    )
    return dx
