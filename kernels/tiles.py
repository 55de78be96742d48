"""The lm_head product in cuBLAS on fp32 tiles of the logits, folded by Triton: the tiles forward
(``FASTDPO_FWD=tiles``).

Tiles forward (TRL's layout: ``config.forward_tiles``, 4096 tokens x 32768 vocabulary ids):
  1. X = H_t @ W_v^T, one cuBLAS product per tile, fp32 result (fp32 accumulation; 512 MB buffer)
  2. ``fold_fwd`` (``logits_logps.py``): per row of the tile, online logsumexp of z = transform(X + b)
     and the target logit z_y if the target lies in the tile -> lse_v, z_y,v
  3. per row, over the vocabulary tiles: lse = logsumexp_v lse_v, logp = sum_v z_y,v - lse
"""
from __future__ import annotations

import torch

from ._matmul import matmul_f32
from .config import forward_tiles
from .logits_logps import fold_fwd


def combine(lse_k, z_y):
    """Per-split lse_k [K, N] and target logits z_y [K, N] (each target in one split) -> (logp [N], lse [N])."""
    lse = torch.logsumexp(lse_k, 0)
    return z_y.sum(0) - lse, lse


def tiles_fwd(h, w, bias, rows, y, *, scale=1.0, softcap=None, temperature=1.0):
    """h [M, D], w [V, D], bias [V] | None, rows/y [N] -> (logp [N], lse [N]) fp32 for the rows h[rows]."""
    N, V = rows.numel(), w.shape[0]
    kw = dict(scale=scale, softcap=softcap, temperature=temperature)
    token_tiles, vocab_tiles = forward_tiles(N, V)
    lse_k, z_y = torch.empty(2, len(vocab_tiles), N, dtype=torch.float32, device=h.device)
    if N == 0:
        return combine(lse_k, z_y)
    tn, tv = token_tiles[0][1], vocab_tiles[0][1]
    flat = torch.empty(tn * tv, dtype=torch.float32, device=h.device)
    local = torch.arange(tn, device=h.device)
    for n0, n1 in token_tiles:
        hc = h.index_select(0, rows[n0:n1])                                       # [n, D]
        for k, (v0, v1) in enumerate(vocab_tiles):
            x = flat[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            matmul_f32(hc, w[v0:v1].t(), out=x)                                    # [n, v1 - v0] fp32
            fold_fwd(x, None if bias is None else bias[v0:v1], local[: n1 - n0], y[n0:n1],
                     lse_k[k, n0:n1], z_y[k, n0:n1], v_lo=v0, **kw)
    return combine(lse_k, z_y)
