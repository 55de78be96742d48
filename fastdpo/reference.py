"""Plain PyTorch versions of every fastdpo op: obviously correct, not fast.

They materialize the full ``[B, T, V]`` logits. Tests compare the fused paths
against them (in float64 for ground truth, in the input dtype for the
same-dtype error), and benchmarks use them as the naive-PyTorch peer:
logits -> log_softmax -> gather -> masked sum.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._loss_names import F_DIVERGENCES, LOSS_TYPES  # noqa: F401  (the names live where torch is not needed)


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


# ----------------------------------------------------------------------------------------------- DPO losses


def model_sequence_logps(model, input_ids, labels, *, attention_mask=None, position_ids=None, average=False):
    """The plain path of a Hugging Face causal LM: ``model(...).logits`` -> log_softmax -> gather -> masked sum, with
    Hugging Face labels (shaped like input_ids, -100 where not scored, shifted here)."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    return sequence_logps_from_logits(logits[:, :-1], labels[:, 1:], average=average)


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(pi/ref) as TRL's DPOTrainer computes it from log(pi/ref)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    t = torch.clamp((alpha - 1.0) * logratios, max=80.0)
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, chosen_lengths=None,
             rejected_lengths=None, gamma=0.5, discopop_tau=0.05, pair_weights=None):
    """The DPO family, term by term as TRL's DPOTrainer writes it (plus SimPO as TRL's CPOTrainer does).

    Inputs are per-pair tensors [B]; a missing reference counts as log-probs of 0. ``pair_weights`` [B]
    multiply each pair's loss before every term's mean (TRL's use_weighting, with ``wpo_weights``).
    Returns (loss, metrics) with TRL's metric names.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    cs = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rs = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = cs - rs
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    ls = label_smoothing
    loss = 0.0
    for name, weight in zip(types, weights):
        if name == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif name == "hinge":
            per = torch.relu(1 - beta * delta)
        elif name == "ipo":
            per = (cs / chosen_lengths.clamp(min=1) - rs / rejected_lengths.clamp(min=1) - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            eps = torch.tensor(ls, dtype=delta.dtype)
            per = (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-eps))
                   + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(eps)))
        elif name == "nca_pair":
            cr, rr_ = beta * chosen_logratios, beta * rejected_logratios
            per = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr_)
        elif name == "robust":
            per = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
        elif name == "bco_pair":
            per = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif name == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif name == "aot":
            d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
            per = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif name == "aot_unpaired":
            d = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
            per = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif name == "apo_zero":
            per = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":
            per = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        elif name == "discopop":
            x = beta * delta
            mod = torch.sigmoid(x / discopop_tau)
            per = -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
        elif name == "sft":
            per = (-pc.sum() / chosen_lengths.sum().clamp(min=1)).expand(pc.shape[0])
        elif name == "sigmoid_norm":
            d = cs / chosen_lengths.clamp(min=1) - rs / rejected_lengths.clamp(min=1)
            per = -F.logsigmoid(beta * d)
        elif name == "simpo":
            x = beta * (pc / chosen_lengths.clamp(min=1) - pr / rejected_lengths.clamp(min=1)) - gamma
            per = -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls
        else:
            raise ValueError(f"unknown loss_type {name!r}")
        if pair_weights is not None:
            per = per * pair_weights.detach()        # constants, as TRL computes them under no_grad
        loss = loss + per.mean() * weight
    if set(types) == {"simpo"}:      # TRL's CPOTrainer: rewards of the averaged log-probs, no reference
        pc, pr = pc / chosen_lengths.clamp(min=1), pr / rejected_lengths.clamp(min=1)
        chosen_logratios, rejected_logratios = pc, pr
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return loss, metrics


def wpo_weights(logits, labels, *, ignore_index=-100):
    """WPO's pair weights [B] as TRL's DPOTrainer computes them (``use_weighting``), from logits [2B, T, V]: per
    reply, exp of the mean over its scored tokens of log p(y) - log sum_v p_v^2; chosen times rejected."""
    logp = torch.log_softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)                            # [2B, T]
    scored = labels != ignore_index
    token = logp.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    aligned = torch.where(scored, token - log_sum_sq, torch.zeros_like(token)).sum(-1)
    weights = torch.exp(aligned / scored.sum(-1).clamp(min=1))
    chosen, rejected = weights.chunk(2)
    return chosen * rejected


def ld_sequence_logps(token_logps, labels, ld_alpha, *, ignore_index=-100):
    """LD-DPO's per-sequence log-probs as TRL's DPOTrainer computes them (``ld_alpha``), from per-token log-probs
    [2B, T] (zero where not scored): the tokens within the length both replies of a pair share count fully, the
    verbose tail beyond it ``ld_alpha`` times."""
    position = (labels != ignore_index).cumsum(1)                         # k for the k-th scored token of a row
    lengths = position[:, -1]
    shared = torch.minimum(*lengths.chunk(2)).repeat(2).unsqueeze(1)
    shared_part = (token_logps * ((position > 0) & (position <= shared))).sum(1)
    tail_part = (token_logps * (position > shared)).sum(1)
    return shared_part + ld_alpha * tail_part
