"""Fused lm_head + log-softmax + target gather, forward and backward.

Forward, per block of BLOCK_N valid tokens and split of the vocabulary (logits never leave registers):
  1. z = transform(H @ W^T + b), one [BLOCK_N, BLOCK_V] tile at a time
  2. online logsumexp: m' = max(m, max_v z); s = s * exp(m - m') + sum_v exp(z - m')
  3. target logit z_y picked from the tile that holds column y
  4. per row, over the splits: lse = logsumexp(m + log s), logp = z_y - lse
Backward, for upstream gradients g [N] (one per token):
  d logp / d l_v = alpha * (onehot_v - p_v) * k_v,   p = exp(z - lse),
  alpha = scale / temperature, k = 1 - tanh^2 with softcap (else 1), so
  dH = dL @ W, dW = dL^T @ H, db = sum_n dL with dL = g * d logp / d l.
  Each program recomputes its logit tile; (onehot - p) is formed in fp32 and
  only dL is cast to the input dtype for the two products. By default
  (``_dlogits_kernel``) dL is written for a chunk of rows and the products are
  matrix multiplies (``_matmul``); ``FASTDPO_BWD=vocab`` writes it for a slice of
  the vocabulary and all rows instead; ``_logps_bwd_kernel`` does them in-kernel.
``FASTDPO_FWD=tiles`` replaces the forward kernel by cuBLAS tiles and a fold (``tiles.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._matmul import fp16_unit, matmul_f32, sliced_products
from ._tile import dot, online_lse_step, softcap_slope, to_dot_operand, transform
from .config import (backward_mode, dlogits_rows, dot_precision, forward_mode, linear_blocks, upcast_dot,
                     vocab_slices, vocab_splits)
from .tiles import combine, tiles_fwd


@triton.jit
def _z_tile(h_ptr, w_ptr, bias_ptr, rows, mask_n, offs_v, V, D, stride_h, stride_w,
            scale, softcap, inv_temp,
            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Transformed logits z [BLOCK_N, BLOCK_V] in fp32; -inf past V."""
    mask_v = offs_v < V
    w_rows = offs_v.to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)        # [BN, BD]
        w = tl.load(w_ptr + w_rows[:, None] + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)        # [BV, BD]
        acc = dot(h, tl.trans(w), acc, UPCAST, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = transform(acc, scale, softcap, inv_temp, HAS_SOFTCAP)
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
})
@triton.jit
def _logps_fwd_kernel(h_ptr, w_ptr, bias_ptr, rows_ptr, y_ptr, lse_ptr, zy_ptr,
                      N, V, D, stride_h, stride_w, scale, softcap, inv_temp, tiles_per_split,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Grid (n-blocks, vocabulary splits): the logsumexp m + log s and target logit z_y of one
    block of rows over one split of the vocabulary, stored at [split, n]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = tl.program_id(1) * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = _z_tile(h_ptr, w_ptr, bias_ptr, rows, mask_n, offs_v, V, D, stride_h, stride_w,
                    scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
                    BLOCK_N, BLOCK_V, BLOCK_D)
        m, s, z_y = online_lse_step(m, s, z_y, z, offs_v, y)
    out = tl.program_id(1) * N + offs_n
    tl.store(lse_ptr + out, m + tl.log(s), mask=mask_n)
    tl.store(zy_ptr + out, z_y, mask=mask_n)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
})
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, bias_ptr, rows_ptr, y_ptr, lse_ptr, g_ptr, dl_ptr,
                    N, V, D, stride_h, stride_w, stride_dl, v_lo, scale, softcap, inv_temp,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Grid (n-blocks, v-blocks): dL [N, V - v_lo] = g * alpha * (onehot - softmax(z)) * k for the
    vocabulary ids [v_lo, V) of a chunk of rows, stored in the input dtype (one rounding, as the
    operand of a tensor-core product) with row stride stride_dl."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_lo + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * (scale * inv_temp)
    z = _z_tile(h_ptr, w_ptr, bias_ptr, rows, mask_n, offs_v, V, D, stride_h, stride_w,
                scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
                BLOCK_N, BLOCK_V, BLOCK_D)
    dz = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
    if HAS_SOFTCAP:
        dz = dz * softcap_slope(tl.where(mask_v[None, :], z, 0.0), softcap, inv_temp)
    dl = to_dot_operand(dz * g[:, None], dl_ptr.dtype.element_ty, UPCAST)
    tl.store(dl_ptr + offs_n.to(tl.int64)[:, None] * stride_dl + (offs_v - v_lo)[None, :],
             dl.to(dl_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def _add(ptrs, value, mask, ATOMIC: tl.constexpr):
    """*ptrs += value: atomically, or read-modify-write where the program owns ptrs."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.heuristics({
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
    "COMPUTE_DH": lambda a: a["dh_ptr"] is not None,
    "COMPUTE_DW": lambda a: a["dw_ptr"] is not None,
    "COMPUTE_DB": lambda a: a["db_ptr"] is not None,
    "FILTER": lambda a: a["filter_eps"] > 0,
    "ATOMIC": lambda a: not (a["LOOP_N"] or a["LOOP_V"]),
})
@triton.jit
def _logps_bwd_kernel(h_ptr, w_ptr, bias_ptr, rows_ptr, y_ptr, lse_ptr, g_ptr,
                      dh_ptr, dw_ptr, db_ptr,
                      N, V, D, stride_h, stride_w, scale, softcap, inv_temp, filter_eps,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                      FILTER: tl.constexpr, LOOP_N: tl.constexpr, LOOP_V: tl.constexpr,
                      ATOMIC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (n-blocks, v-blocks): one tile per program, accumulating with atomics.

    Deterministic passes instead loop over one axis so that each program owns
    what it writes: LOOP_V (grid (n-blocks, 1)) owns its dh rows, LOOP_N
    (grid (1, v-blocks)) owns its dW / db rows.
    """
    n_lo = tl.program_id(0)
    n_hi = n_lo + 1
    if LOOP_N:
        n_hi = tl.cdiv(N, BLOCK_N)
    v_lo = tl.program_id(1)
    v_hi = v_lo + 1
    if LOOP_V:
        v_hi = tl.cdiv(V, BLOCK_V)
    g_scale = scale * inv_temp
    out_ty = h_ptr.dtype.element_ty
    for nb in range(n_lo, n_hi):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        y = tl.load(y_ptr + offs_n, mask=mask_n, other=0)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * g_scale
        for vb in range(v_lo, v_hi):
            offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = _z_tile(h_ptr, w_ptr, bias_ptr, rows, mask_n, offs_v, V, D, stride_h, stride_w,
                        scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_D)
            # 1. d logp / d z = onehot - softmax, in fp32
            dz = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
            keep = True
            if FILTER:
                # 2. gradient filtering: a tile whose |onehot - p| is below the
                #    input dtype's resolution everywhere contributes nothing visible
                #    (padding rows and columns do not count; NaN counts as large)
                mag = tl.where(dz == dz, tl.abs(dz), float("inf"))
                mag = tl.where(mask_n[:, None] & mask_v[None, :], mag, 0.0)
                keep = tl.max(tl.max(mag, 1), 0) >= filter_eps
            if keep:
                if HAS_SOFTCAP:
                    dz = dz * softcap_slope(tl.where(mask_v[None, :], z, 0.0), softcap, inv_temp)
                # 3. dL = g * alpha * (onehot - p) * k; zero outside the valid tile.
                #    dH takes the per-row g after its product (in fp32), so an fp16
                #    operand never holds g * p: no overflow or underflow from g's scale.
                dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
                dl = dz * g[:, None]
                if COMPUTE_DB:
                    _add(db_ptr + offs_v, tl.sum(dl, 0), mask_v, ATOMIC)
                dz_lo = to_dot_operand(dz, out_ty, UPCAST)
                dl_lo = to_dot_operand(dl, out_ty, UPCAST)
                # (two loops, not one with both products: Triton 3.6 on sm_90 computed a wrong
                #  dH with both in one loop body once D spanned several BLOCK_D steps)
                if COMPUTE_DH:
                    for d0 in range(0, D, BLOCK_D):
                        # 4. dH[n, d] += dL @ W[v, d]        (dh is compact: [N, D] fp32)
                        offs_d = d0 + tl.arange(0, BLOCK_D)
                        mask_d = offs_d < D
                        w = tl.load(w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                        part = dot(dz_lo, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32),
                                   UPCAST, DOT_PRECISION) * g[:, None]
                        _add(dh_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], part,
                             mask_n[:, None] & mask_d[None, :], ATOMIC)
                if COMPUTE_DW:
                    for d0 in range(0, D, BLOCK_D):
                        # 5. dW[v, d] += dL^T @ H[n, d]      (dw: [V, D] fp32)
                        offs_d = d0 + tl.arange(0, BLOCK_D)
                        mask_d = offs_d < D
                        h = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                        part = dot(tl.trans(dl_lo), h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32),
                                   UPCAST, DOT_PRECISION)
                        _add(dw_ptr + offs_v.to(tl.int64)[:, None] * D + offs_d[None, :], part,
                             mask_v[:, None] & mask_d[None, :], ATOMIC)


def _common(h, w, rows, y):
    assert h.dim() == 2 and h.stride(1) == 1, "h must be [M, D] with unit column stride"
    assert w.is_contiguous() and w.shape[1] == h.shape[1]
    assert rows.dtype == torch.int64 and y.dtype == torch.int64 and rows.shape == y.shape
    return rows.numel(), w.shape[0], w.shape[1]


def logps_fwd(h, w, bias, rows, y, *, scale=1.0, softcap=None, temperature=1.0):
    """h [M, D], w [V, D], bias [V] | None, rows/y [N] -> (logp [N], lse [N]) fp32 for the rows h[rows]."""
    N, V, D = _common(h, w, rows, y)
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty.clone()
    if forward_mode() == "tiles" and h.dtype != torch.float32:
        # (fp32 inputs keep the kernel: the backward's recompute then rounds its logits as the forward
        #  did, where cuBLAS's fp32 products would differ from it by more than fp32's tolerance)
        return tiles_fwd(h, w, bias, rows, y, scale=scale, softcap=softcap, temperature=temperature)
    cfg = linear_blocks(h.dtype, h.device, "forward")
    n_blocks, v_blocks = triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V)
    splits = vocab_splits(n_blocks, v_blocks, h.device)
    tiles_per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, tiles_per_split)     # none left empty
    lse_k, z_y = torch.empty(2, splits, N, dtype=torch.float32, device=h.device)
    _logps_fwd_kernel[(n_blocks, splits)](
        h, w, bias, rows, y, lse_k, z_y, N, V, D, h.stride(0), w.stride(0),
        float(scale), float(softcap or 0.0), 1.0 / temperature, tiles_per_split,
        UPCAST=upcast_dot(h.dtype), DOT_PRECISION=dot_precision(h.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return combine(lse_k, z_y)       # lse = logsumexp_k lse_k; z_y is non-zero in one split only


def logps_bwd(h, w, bias, rows, y, lse, g, *, need_dh, need_dw, need_db, scale=1.0, softcap=None,
              temperature=1.0, filter_eps=None, deterministic=False):
    """Gradients of sum_n g[n] * logp[n]: (dh [N, D] fp32 | None, dw [V, D] | None, db [V] fp32 | None).

    dh is compact (row n is token rows[n]); dw is fp32, or in the weight dtype with
    ``FASTDPO_BWD=vocab``. The default ("products") backward takes the rows a chunk
    at a time: ``_dlogits_kernel`` recomputes the chunk's logits and writes their
    gradient dL [rows, V] in the input dtype, then dH = dL @ W and dW += dL^T @ H
    run as matrix products accumulated in fp32 (cuBLAS on CUDA). ``FASTDPO_BWD=vocab``
    takes the vocabulary a slice at a time instead (``_vocab_bwd``): no fp32 [V, D]
    buffer. Neither uses atomics: repeatable bitwise. ``FASTDPO_BWD=fused`` selects
    the one-kernel backward (no [rows, V] buffer; atomics, or with deterministic=True
    two passes; gradient filtering with filter_eps).
    """
    N, V, D = _common(h, w, rows, y)
    mode = backward_mode()
    f32 = dict(dtype=torch.float32, device=h.device)
    dh = torch.zeros(N, D, **f32) if need_dh else None
    dw = None
    if need_dw and mode == "vocab":                        # in the weight dtype, every slice written once
        dw = (torch.empty if N else torch.zeros)(V, D, dtype=w.dtype, device=w.device)
    elif need_dw:
        dw = torch.zeros(V, D, **f32)
    db = torch.zeros(V, **f32) if need_db else None
    if N == 0 or not (need_dh or need_dw or need_db):
        return dh, dw, db
    cfg = linear_blocks(h.dtype, h.device, "fused" if mode == "fused" else "dlogits")
    common = dict(N=N, V=V, D=D, stride_h=h.stride(0), stride_w=w.stride(0), scale=float(scale),
                  softcap=float(softcap or 0.0), inv_temp=1.0 / temperature,
                  UPCAST=upcast_dot(h.dtype), DOT_PRECISION=dot_precision(h.dtype),
                  BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # fp16: g scaled by a power of two (``fp16_unit``), undone exactly on the gradients
    unit = fp16_unit(g) if h.dtype == torch.float16 else None
    if unit is not None:
        g = g * unit
    if mode == "vocab":
        _vocab_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common, None if unit is None else 1.0 / unit)
        return dh, dw, db
    if mode == "fused":
        _fused_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common, filter_eps, deterministic)
    else:
        _products_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common)
    for grad in (dh, dw, db):
        if grad is not None and unit is not None:
            grad /= unit
    return dh, dw, db


def _products_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common):
    N, V = common["N"], common["V"]
    chunk = min(N, dlogits_rows(V, h.element_size(), cfg.BLOCK_N))
    dl_buf = torch.empty(chunk, V, dtype=h.dtype, device=h.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        dl = dl_buf[: e - s]
        _dlogits_kernel[(triton.cdiv(e - s, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))](
            h, w, bias, rows[s:e], y[s:e], lse[s:e], g[s:e], dl, stride_dl=V, v_lo=0, **{**common, "N": e - s})
        if dh is not None:
            matmul_f32(dl, w, out=dh[s:e])                                    # [c, D]
        if dw is not None:
            matmul_f32(dl.t(), h.index_select(0, rows[s:e]), out=dw, accumulate=True)
        if db is not None:
            db += dl.sum(0, dtype=torch.float32)


def _vocab_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common, scale):
    """Vocabulary slices (the pattern of Megatron-LM's Hopper linear cross-entropy): per slice,
    ``_dlogits_kernel`` recomputes the logits of all N scored tokens and writes dL [N, width]; then
    dH += dL @ W_s in fp32 and dW_s = dL^T @ h[rows], one product over all tokens written once in the
    weight dtype (``sliced_products``). Workspace, independent of V: dL (at most
    max(VOCAB_SLICE_BYTES, N * BLOCK_V * itemsize)), h[rows] [N, D] in the input dtype, and dh."""
    N = common["N"]
    slices = vocab_slices(N, common["V"], h.element_size(), cfg.BLOCK_V)
    flat = torch.empty(N * (slices[0][1] - slices[0][0]), dtype=h.dtype, device=h.device)
    hs = h.index_select(0, rows) if dw is not None else None                  # [N, D]

    def dl_slice(v0, v1):
        dl = flat[: N * (v1 - v0)].view(N, v1 - v0)
        _dlogits_kernel[(triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(v1 - v0, cfg.BLOCK_V))](
            h, w, bias, rows, y, lse, g, dl, stride_dl=v1 - v0, v_lo=v0, **{**common, "V": v1})
        return dl

    sliced_products(slices, dl_slice, w, hs, dh=dh, dw=dw, db=db, scale=scale)


def _fused_bwd(h, w, bias, rows, y, lse, g, dh, dw, db, cfg, common, filter_eps, deterministic):
    N, V = common["N"], common["V"]
    n_blocks, v_blocks = triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V)
    common = dict(common, filter_eps=float(filter_eps or 0.0))
    tensors = (h, w, bias, rows, y, lse, g)
    if not deterministic:
        _logps_bwd_kernel[(n_blocks, v_blocks)](*tensors, dh, dw, db, LOOP_N=False, LOOP_V=False, **common)
        return
    if dh is not None:
        _logps_bwd_kernel[(n_blocks, 1)](*tensors, dh, None, None, LOOP_N=False, LOOP_V=True, **common)
    if dw is not None or db is not None:
        _logps_bwd_kernel[(1, v_blocks)](*tensors, None, dw, db, LOOP_N=True, LOOP_V=False, **common)
