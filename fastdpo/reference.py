"""Plain PyTorch versions of every fastdpo op: obviously correct, not fast.

They materialize the full ``[B, T, V]`` logits. Tests compare the fused paths
against them (in float64 for ground truth, in the input dtype for the
same-dtype error), and benchmarks use them as the naive-PyTorch peer:
logits -> log_softmax -> gather -> masked sum.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def logit_transform(logits: torch.Tensor, logit_scale: float = 1.0, softcap: Optional[float] = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """z = softcap * tanh(logits * logit_scale / softcap) / temperature (no tanh when softcap is None)."""
    z = logits * logit_scale if logit_scale != 1.0 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


def sequence_logps_from_logits(logits, labels, *, ignore_index=-100, logit_scale=1.0, softcap=None,
                               temperature=1.0, average=False, return_token_logps=False):
    """Per-sequence sum (or mean) of log p(label) from logits [B, T, V]; float32 (float64 for float64 input)."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logit_transform(logits.to(out_dtype), logit_scale, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)                                   # [B, T, V]
    scored = labels != ignore_index                                       # [B, T]
    safe = torch.where(scored, labels, torch.zeros_like(labels))
    token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)               # [B, T]
    token = torch.where(scored, token, torch.zeros_like(token))
    seq = token.sum(-1)
    if average:
        seq = seq / scored.sum(-1).clamp(min=1)
    return (seq, token) if return_token_logps else seq


def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, logit_scale=1.0, softcap=None,
                   temperature=1.0, average=False, return_token_logps=False, compute_dtype=None):
    """Naive log-probs from hidden [B, T, D] and weight [V, D].

    The product runs in ``compute_dtype`` (default: the input dtype, as a plain
    ``hidden @ weight.T`` would), the log-softmax in float32 or float64.
    """
    dtype = compute_dtype or hidden.dtype
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return sequence_logps_from_logits(
        logits, labels, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, average=average, return_token_logps=return_token_logps,
    )
