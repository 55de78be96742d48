"""The lm_head product in cuBLAS on fp32 tiles of the logits, folded by Triton: the tiles forward
(``FASTDPO_FWD=tiles``) and the chunk steps of the one-pass ``linear_dpo_loss``.

Tiles forward (TRL's layout: ``config.forward_tiles``, 4096 tokens x 32768 vocabulary ids):
  1. X = H_t @ W_v^T, one cuBLAS product per tile, fp32 result (fp32 accumulation; 512 MB buffer)
  2. ``fold_fwd`` (``logits_logps.py``): per row of the tile, online logsumexp of z = transform(X + b)
     and the target logit z_y if the target lies in the tile -> lse_v, z_y,v
  3. per row, over the vocabulary tiles: lse = logsumexp_v lse_v, logp = sum_v z_y,v - lse
One pass of the loss over a chunk of whole pairs (``fastdpo/_fused_loss.py`` runs the chunks):
  ``chunk_logits``: X = H_c @ W^T [n, V] fp32 (one product) and lse, logp per row;
  ``chunk_grads``: once the pairs' loss gradients g are known, dL = g * alpha * (onehot - p) * k
  from X, one vocabulary slice at a time (``fold_bwd`` into an input-dtype buffer), and the two
  gradient products (``_matmul.sliced_products``): three products in all, no recompute.
"""
from __future__ import annotations

import torch

from ._matmul import matmul_f32, sliced_products
from .config import forward_tiles, logits_blocks, vocab_slices
from .logits_logps import fold_bwd, fold_fwd

# the labels handed to fold_bwd are all scored: no vocabulary id is negative
_NO_IGNORE = -1


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


def chunk_logits(h, w, bias, rows, y, x, *, scale=1.0, softcap=None, temperature=1.0):
    """x [n, V] fp32 (written) = h[rows] @ W^T, the raw logits of a chunk of n scored tokens.

    Returns (hc = h[rows] [n, D], logp [n], lse [n])."""
    hc = h.index_select(0, rows)                                                   # [n, D]
    matmul_f32(hc, w.t(), out=x)                                                   # [n, V]
    lse, z_y = torch.empty(2, 1, rows.numel(), dtype=torch.float32, device=h.device)
    fold_fwd(x, bias, torch.arange(rows.numel(), device=h.device), y, lse[0], z_y[0],
             scale=scale, softcap=softcap, temperature=temperature)
    logp, lse = combine(lse, z_y)
    return hc, logp, lse


def chunk_grads(x, hc, w, bias, y, lse, g, *, dh, dw, db, scale=1.0, softcap=None, temperature=1.0,
                grad_scale=None):
    """Gradients of sum_t g_t logp_t for the chunk whose raw logits x [n, V] chunk_logits left:
    dh [n, D] fp32 (written), dw [V, D] fp32 and db [V] fp32 (added to); any may be None.

    Workspace: dL [n, width] in hc's dtype, width from ``config.vocab_slices``."""
    n, V = x.shape
    slices = vocab_slices(n, V, hc.element_size(), logits_blocks().BLOCK_V)
    flat = torch.empty(n * (slices[0][1] - slices[0][0]), dtype=hc.dtype, device=hc.device)

    def dl_slice(v0, v1):
        dl = flat[: n * (v1 - v0)].view(n, v1 - v0)
        fold_bwd(x[:, v0:v1], None if bias is None else bias[v0:v1], y, lse, g, dl, v_lo=v0,
                 ignore_index=_NO_IGNORE, scale=scale, softcap=softcap, temperature=temperature)
        return dl

    sliced_products(slices, dl_slice, w, hc, dh=dh, dw=dw, db=db, dw_accumulate=True, scale=grad_scale)
