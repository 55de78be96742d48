"""The drop-in DPO losses: ``dpo_loss`` on log-probs, ``linear_dpo_loss`` from hidden states.

Loss types follow TRL's DPOTrainer term by term (``fastdpo.reference.dpo_loss``
writes them out plainly), plus ``simpo`` as TRL's CPOTrainer defines it. The
per-pair losses and their gradients come from one Triton kernel over pairs
(``kernels/dpo_loss.py``) or its PyTorch twin; the batch-level ``aot``,
``aot_unpaired`` and ``sft`` use PyTorch around it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from . import _pair_loss
from ._fused_loss import LENGTH_TIED, TIED, FusedLinearDPO, pair_cap, pair_chunks, pair_token_counts, tie
from ._validate import check_labels, check_linear_inputs
from .logps import logps_params, resolve_backend, sequence_logps
from .reference import F_DIVERGENCES, LOSS_TYPES

BATCH_LOSSES = ("aot", "aot_unpaired", "sft")
# dpo_loss's loss options and their defaults (its signature spells the same values out)
LOSS_DEFAULTS = dict(loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
                     f_alpha_divergence_coef=0.5, gamma=0.5, discopop_tau=0.05, pair_weights=None)
LENGTH_LOSSES = ("ipo", "sigmoid_norm", "simpo", "sft")
# TRL: only losses built on the chosen-rejected score difference take another f-divergence.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# TRL: WPO's per-pair weights would be misaligned by the sorting of these.
UNWEIGHTED_LOSSES = ("aot", "aot_unpaired")
# Reference-free use: losses that see the policy only through the chosen-rejected margin.
REFERENCE_FREE_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "aot", "discopop", "sft",
                         "sigmoid_norm", "simpo")


@dataclass(frozen=True)
class DPOParams:
    loss_types: tuple
    loss_weights: tuple
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    gamma: float
    discopop_tau: float
    ld_alpha: Optional[float] = None     # LD-DPO (linear_dpo_loss): weight of the tokens beyond the shared length
    use_weighting: bool = False          # WPO (linear_dpo_loss): pair weights from the policy's own probabilities

    def pair_kwargs(self):
        return dict(f_divergence_type=self.f_divergence_type, beta=self.beta, label_smoothing=self.label_smoothing,
                    gamma=self.gamma, discopop_tau=self.discopop_tau,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef)


def pair_terms(params: DPOParams) -> list:
    """[(loss_type, weight)] of the per-pair terms (the batch-level aot, aot_unpaired, sft left out)."""
    return [(n, w) for n, w in zip(params.loss_types, params.loss_weights) if n not in BATCH_LOSSES]


def _check_label_smoothing(types, ls) -> None:
    if not isinstance(ls, (int, float)) or not math.isfinite(ls):
        raise ValueError(f"label_smoothing must be a number, got {ls!r}")
    if "robust" in types and not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type 'robust', got {ls}")
    if "exo_pair" in types and not 0.0 < ls < 1.0:
        raise ValueError(f"label_smoothing must lie in (0, 1) for loss_type 'exo_pair' (the EXO paper uses 1e-3), "
                         f"got {ls}")
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {ls}")
    users = {"robust", "exo_pair", "aot", "aot_unpaired", "simpo"}
    if ls != 0.0 and not users & set(types):
        raise ValueError(f"label_smoothing={ls} has no effect on loss_type {list(types)}; it is used by "
                         f"{sorted(users)}")


def _check_ld_and_weighting(types, ld_alpha, use_weighting) -> None:
    if ld_alpha is not None:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
        if "sft" in types:
            raise ValueError("ld_alpha with loss_type 'sft' is not supported: TRL's sft term averages the unweighted "
                             "per-token log-probs while the other terms use the LD-weighted sums")
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    if use_weighting:
        _check_weightable(types, "use_weighting")


def _check_weightable(types, what: str) -> None:
    sorted_ = [t for t in types if t in UNWEIGHTED_LOSSES]
    if sorted_:
        raise ValueError(f"{what}: per-pair weights are not defined for loss_type {sorted_}, which sort the pairs "
                         "of a batch (TRL refuses WPO weighting for them too)")


def make_params(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                gamma, discopop_tau, *, ld_alpha=None, use_weighting=False) -> DPOParams:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; valid: {', '.join(LOSS_TYPES)}")
    weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(types)}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
    if f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSSES):
        raise ValueError(f"f_divergence_type={f_divergence_type!r} is only defined for loss_type in "
                         f"{list(F_DIVERGENCE_LOSSES)}, got {list(types)}")
    _check_label_smoothing(types, label_smoothing)
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau!r}")
    _check_ld_and_weighting(types, ld_alpha, use_weighting)
    return DPOParams(types, weights, float(beta), float(label_smoothing), f_divergence_type,
                     float(f_alpha_divergence_coef), float(gamma), float(discopop_tau),
                     None if ld_alpha is None else float(ld_alpha), use_weighting)


def _check_logps(name, x, B, device, integer_ok=False):
    if not isinstance(x, torch.Tensor) or not (x.dtype.is_floating_point or integer_ok):
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if x.shape != (B,):
        raise ValueError(f"{name} must have shape [{B}] (one value per pair), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but policy_chosen_logps is on {device}")


def _batch_loss(name, pc, pr, rc, rr, lc, pw, p: DPOParams):
    """aot, aot_unpaired, sft: (mean loss, gradients w.r.t. pc, pr, rc, rr) by autograd (sorting couples pairs)."""
    from .reference import dpo_loss as reference_loss
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (pc, pr, rc, rr)]
        loss, _ = reference_loss(*leaves, beta=p.beta, loss_type=name, label_smoothing=p.label_smoothing,
                                 chosen_lengths=lc, pair_weights=pw)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(pc) if g is None else g for g in grads]


class DPOLossFn(torch.autograd.Function):
    """(pc, pr, rc, rr, lc, lr, pair weights) [B] each -> scalar loss; gradients computed in forward, scaled in
    backward."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, pw, params: DPOParams, backend: str):
        ctx.dtypes = [t.dtype if t is not None else None for t in (pc, pr, rc, rr)]
        f32 = torch.float64 if pc.dtype == torch.float64 else torch.float32
        pc, pr = pc.to(f32), pr.to(f32)
        has_ref = rc is not None
        rc_, rr_ = (rc.to(f32), rr.to(f32)) if has_ref else (torch.zeros_like(pc), torch.zeros_like(pr))
        lc_ = None if lc is None else lc.to(f32)
        lr_ = None if lr is None else lr.to(f32)
        pw = None if pw is None else pw.to(f32)
        pairs = _pair_loss.weighted_pair_losses(
            pc, pr, rc_ if has_ref else None, rr_ if has_ref else None, lc_, lr_, pair_terms(params),
            params.pair_kwargs(), pc.shape[0], backend, pw)
        total = pairs.loss.to(f32)
        grads = [g.to(f32) for g in pairs[1:]]
        for name, weight in zip(params.loss_types, params.loss_weights):
            if name in BATCH_LOSSES:
                loss, g = _batch_loss(name, pc, pr, rc_, rr_, lc_, pw, params)
                total += weight * loss
                for acc, gi in zip(grads, g):
                    acc += weight * gi
        ctx.save_for_backward(*grads)
        ctx.has_ref = has_ref
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gpc, gpr, grc, grr = ((grad * g).to(dt) if dt is not None else None
                              for g, dt in zip(ctx.saved_tensors, ctx.dtypes))
        need = ctx.needs_input_grad
        return (gpc if need[0] else None, gpr if need[1] else None,
                grc if ctx.has_ref and need[2] else None, grr if ctx.has_ref and need[3] else None,
                None, None, None, None, None)


def _metrics(pc, pr, rc, rr, params: DPOParams, lc=None, lr=None):
    """TRL's reward metrics. With simpo as the only loss type they are TRL's CPOTrainer's: of the log-probs averaged
    over each reply's scored tokens (lc, lr), without a reference (SimPO has none)."""
    if set(params.loss_types) == {"simpo"}:
        pc, pr, rc, rr = pc / lc.clamp(min=1), pr / lr.clamp(min=1), None, None
    beta = params.beta
    pc, pr = pc.detach(), pr.detach()
    cr = beta * (pc if rc is None else pc - rc.detach())
    rr_ = beta * (pr if rr is None else pr - rr.detach())
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr_.mean(),
        "rewards/accuracies": (cr > rr_).float().mean(),
        "rewards/margins": (cr - rr_).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None, *,
             beta: float = 0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
             loss_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             chosen_lengths: Optional[torch.Tensor] = None, rejected_lengths: Optional[torch.Tensor] = None,
             gamma: float = 0.5, discopop_tau: float = 0.05, pair_weights: Optional[torch.Tensor] = None,
             backend: str = "auto"):
    """DPO-family loss of per-pair log-probs [B]; returns (loss, metrics) with TRL's metric names.

    ``ref_*_logps=None`` is reference-free (the reference counts as log-prob 0, as
    TRL's ``reference_free``), allowed for losses that see the policy only through
    the chosen-rejected margin. ``chosen_lengths``/``rejected_lengths`` (scored
    tokens per sequence) are needed by ipo, sigmoid_norm, simpo and sft.
    ``pair_weights`` [B] multiply each pair's loss in every term, as constants (no
    gradient): TRL's ``use_weighting`` (WPO) with the weights of ``wpo_weights``.
    LD-DPO (TRL's ``ld_alpha``) changes the log-probs themselves: pass sums weighted
    by ``ld_token_weights``, or use ``linear_dpo_loss(..., ld_alpha=...)``.
    Metrics are detached tensors: nothing here synchronizes with the host.
    """
    params = make_params(loss_type, loss_weights, beta, label_smoothing, f_divergence_type,
                         f_alpha_divergence_coef, gamma, discopop_tau)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if not isinstance(pc, torch.Tensor) or pc.dim() != 1 or pc.shape[0] == 0:
        raise ValueError("policy_chosen_logps must be a non-empty 1-D tensor [B] (one value per pair)")
    B, device = pc.shape[0], pc.device
    _check_logps("policy_rejected_logps", pr, B, device)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen_logps is None:
        need = [t for t in params.loss_types if t not in REFERENCE_FREE_LOSSES]
        if need or (params.f_divergence_type != "reverse_kl" and set(params.loss_types) - {"sft", "simpo"}):
            raise ValueError(f"loss_type {need or list(params.loss_types)} with f_divergence_type="
                             f"{params.f_divergence_type!r} needs ref_chosen_logps and ref_rejected_logps; "
                             f"reference-free works for {list(REFERENCE_FREE_LOSSES)} (with reverse_kl)")
    else:
        _check_logps("ref_chosen_logps", ref_chosen_logps, B, device)
        _check_logps("ref_rejected_logps", ref_rejected_logps, B, device)
    if set(params.loss_types) & set(LENGTH_LOSSES):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {[t for t in params.loss_types if t in LENGTH_LOSSES]} needs chosen_lengths "
                             "and rejected_lengths (scored tokens per sequence); linear_dpo_loss derives them")
        _check_logps("chosen_lengths", chosen_lengths, B, device, integer_ok=True)
        _check_logps("rejected_lengths", rejected_lengths, B, device, integer_ok=True)
    if pair_weights is not None:
        _check_logps("pair_weights", pair_weights, B, device)
        _check_weightable(params.loss_types, "pair_weights")
        pair_weights = pair_weights.detach()
    backend = resolve_backend("torch" if backend == "reference" else backend, pc)
    loss = DPOLossFn.apply(pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
                           pair_weights, params, backend)
    return loss, _metrics(pc, pr, ref_chosen_logps, ref_rejected_logps, params, chosen_lengths, rejected_lengths)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                    *, beta: float = 0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
                    bias: Optional[torch.Tensor] = None, ignore_index: int = -100, logit_scale: float = 1.0,
                    softcap: Optional[float] = None, temperature: float = 1.0,
                    ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                    ref_bias: Optional[torch.Tensor] = None, backend: str = "auto",
                    one_pass: Union[bool, str, None] = None, return_logps: bool = False,
                    ld_alpha: Optional[float] = None, use_weighting: bool = False, **loss_kwargs):
    """Hidden states [2B, T, D] (B chosen rows, then B rejected) and lm_head weight [V, D] -> (loss, metrics).

    The reference comes as log-probs [B] each, or as ``ref_hidden`` (+ ``ref_weight``,
    default ``weight``, and ``ref_bias``): then its log-probs are computed by the same fused op under no-grad.
    Without ``ref_weight`` the reference uses the policy's head, ``bias`` included (``ref_bias`` replaces it);
    with ``ref_weight`` its head is ``ref_weight`` and ``ref_bias`` only, so when the policy has a ``bias``,
    ``ref_bias`` must be given too (a zero tensor for a reference head without one).
    Sequence lengths for the length-normalized losses are counted from ``labels``.
    Other keyword options (label_smoothing, loss_weights, f_divergence_type, gamma, ...) as in ``dpo_loss``.
    ``return_logps=True`` also returns the policy's per-sequence log-probs [2B] (detached): the same numbers the
    loss was computed from (a trainer's reference pass can share the training pass's arithmetic exactly).

    ld_alpha (LD-DPO, as TRL's DPOTrainer): each sequence's log-prob is the sum over the
    tokens within the length its pair's replies share plus ``ld_alpha`` times the sum
    beyond it (``ld_token_weights``), for the policy and for ``ref_hidden``; given
    ``ref_*_logps`` must be weighted the same way. use_weighting (WPO, as TRL): each
    pair's loss is multiplied by ``wpo_weights`` of the policy (one more no-grad
    forward of the fused op). Neither takes the one pass.

    one_pass: form the gradients while scoring, three matrix products instead of
    sequence_logps' four (no logit recompute); ``"auto"`` where it applies, ``True``
    forces it (a ValueError says why it cannot), ``False`` never. ``None``: "auto" on
    the chunked PyTorch path, ``FASTDPO_ONE_PASS`` (default "off") on the Triton one.
    Chunked PyTorch path (CPU, fp32/fp64): any per-pair loss, chunks of whole pairs whose
    [tokens, V] buffers fit ``_chunked.CHUNK_BYTES`` (128 MiB); a longer pair, pair by pair
    for sigmoid, hinge, exo_pair, robust, discopop (or, length-normalized, ipo,
    sigmoid_norm, simpo) with reverse KL, whose rejected gradient is tied to the chosen
    one (one extra [V, D] fp32 accumulator). Triton path (CUDA): any per-pair loss, chunks
    of whole pairs whose fp32 logits fit ``kernels.config.ONE_PASS_BYTES`` (1 GiB; longer
    pairs: sequence_logps + dpo_loss), plus an fp32 [V, D] accumulator; not yet measured
    on a GPU. Otherwise (losses that couple the pairs of a batch: aot, aot_unpaired, sft), and
    for references that require grad, sequence_logps + dpo_loss.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be a tensor [2B, T, D]: the B chosen rows, then the B rejected rows")
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden must stack chosen and rejected rows ([2B, T, D]); got an odd row count "
                         f"{hidden.shape[0]}")
    logp_kw = dict(bias=bias, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                   temperature=temperature, backend=backend)
    unknown = set(loss_kwargs) - set(LOSS_DEFAULTS)
    if unknown:
        raise TypeError(f"linear_dpo_loss got unexpected keyword arguments {sorted(unknown)}; loss options are "
                        f"{list(LOSS_DEFAULTS) + ['ld_alpha', 'use_weighting']}")
    o = {**LOSS_DEFAULTS, **loss_kwargs}
    params = make_params(loss_type, o["loss_weights"], beta, o["label_smoothing"], o["f_divergence_type"],
                         o["f_alpha_divergence_coef"], o["gamma"], o["discopop_tau"], ld_alpha=ld_alpha,
                         use_weighting=use_weighting)
    if use_weighting and o["pair_weights"] is not None:
        raise ValueError("give use_weighting=True or pair_weights, not both")
    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("give the reference either as ref_hidden or as ref_*_logps, not both")
        if ref_weight is not None and bias is not None and ref_bias is None:
            raise ValueError("ref_weight is given and the policy head has a bias: give ref_bias too (the "
                             "reference head's bias; a zero tensor if it has none), it is not taken from bias")
        with torch.no_grad():
            ref, _ = _weighted_logps(ref_hidden, weight if ref_weight is None else ref_weight, labels,
                                     params.ld_alpha, {**logp_kw, "bias": bias if ref_bias is None else ref_bias})
        ref_chosen_logps, ref_rejected_logps = ref.chunk(2)
    check_linear_inputs(hidden, weight, bias)
    labels = check_labels(labels, hidden.shape[:2], hidden.device, weight.shape[0], ignore_index)
    fused = _one_pass(hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, params, backend,
                      one_pass, ignore_index, o["pair_weights"] is not None, softcap)
    if fused is not None:
        lp = logps_params(ignore_index, logit_scale, softcap, temperature)
        loss, pc, pr = FusedLinearDPO.apply(hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps,
                                            lp, params, fused, torch.is_grad_enabled())
        lc, lr = (labels != ignore_index).sum(1).to(pc.dtype).chunk(2)
        out = loss, _metrics(pc, pr, ref_chosen_logps, ref_rejected_logps, params, lc, lr)
        return (*out, torch.cat([pc, pr]).detach()) if return_logps else out
    logps, plain = _weighted_logps(hidden, weight, labels, params.ld_alpha, logp_kw)
    if use_weighting:
        loss_kwargs["pair_weights"] = wpo_weights(hidden, weight, labels, logps=plain, **logp_kw)
    lengths = (labels != ignore_index).sum(1).to(logps.dtype)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    out = dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                   chosen_lengths=lc, rejected_lengths=lr, backend=backend, **loss_kwargs)
    return (*out, logps.detach()) if return_logps else out


def ld_token_weights(labels: torch.Tensor, ld_alpha: float, ignore_index: int = -100,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LD-DPO's weight [2B, T] of each target of labels [2B, T] (the B chosen rows, then the B rejected):
    1 on a reply's first min(L_chosen, L_rejected) scored tokens (the length its pair's replies share),
    ``ld_alpha`` on the rest of its scored tokens, 0 where not scored."""
    scored = labels != ignore_index
    position = scored.cumsum(1)                                  # [2B, T] k on the k-th scored token of a row
    shared = torch.minimum(*position[:, -1].chunk(2)).repeat(2)  # [2B] the pair's shared length, for both rows
    return scored.to(dtype).masked_fill(scored & (position > shared[:, None]), float(ld_alpha))


def _weighted_logps(hidden, weight, labels, ld_alpha, logp_kw):
    """(the log-probs the loss uses [2B], their plain sums [2B]): equal unless LD-DPO weights the tokens."""
    if ld_alpha is None:
        logps = sequence_logps(hidden, weight, labels, **logp_kw)
        return logps, logps
    logps, token = sequence_logps(hidden, weight, labels, return_token_logps=True, **logp_kw)
    return (token * ld_token_weights(labels, ld_alpha, logp_kw["ignore_index"], token.dtype)).sum(1), logps


def wpo_weights(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                logps: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                logit_scale: float = 1.0, softcap: Optional[float] = None, temperature: float = 1.0,
                backend: str = "auto") -> torch.Tensor:
    """WPO's pair weights [B] (TRL's ``use_weighting``), without gradient, for ``dpo_loss(pair_weights=...)``.

    Per reply, exp of the mean over its scored tokens of log p(y) - log sum_v p_v^2 under the policy (hidden/labels
    as in ``linear_dpo_loss``); chosen times rejected. With z the (temperature-scaled) logits,
    log sum_v p_v^2 = lse(2z) - 2 lse(z), so log p(y) - log sum_v p_v^2 = z_y + lse(z) - lse(2z)
    = log p_{T/2}(y) - log p_T(y): the fused op's sequence sums at half the temperature minus those at the
    temperature. ``logps``: the latter [2B] where already computed (one forward then, no backward).
    """
    kw = dict(bias=None if bias is None else bias.detach(), ignore_index=ignore_index, logit_scale=logit_scale,
              softcap=softcap, backend=backend)
    with torch.no_grad():
        hidden, weight = hidden.detach(), weight.detach()
        if logps is None:
            logps = sequence_logps(hidden, weight, labels, temperature=temperature, **kw)
        half = sequence_logps(hidden, weight, labels, temperature=temperature / 2, **kw)
        lengths = (labels != ignore_index).sum(1).clamp(min=1)
        chosen, rejected = torch.exp((half - logps.detach()) / lengths).chunk(2)
        return chosen * rejected


ONE_PASS_CHOICES = (None, "auto", True, False)


def _one_pass(hidden, weight, bias, labels, ref_c, ref_r, params: DPOParams, backend: str, option,
              ignore_index: int, weighted: bool, softcap) -> Optional[str]:
    """The one-pass kind ("torch_pairs", or "tied" / "length": chunked PyTorch path; "pairs": Triton) when the one pass
    is asked for and applies, else None (sequence_logps + dpo_loss); ValueError when forced in vain."""
    if option not in ONE_PASS_CHOICES:
        raise ValueError(f"one_pass must be None, 'auto', True or False, got {option!r}")
    option = bool(option) if option in (True, False) else option
    backend = resolve_backend(backend, hidden)
    if option is None and backend == "triton":
        from .kernels.config import one_pass_mode
        option = {"off": False, "auto": "auto", "on": True}[one_pass_mode()]
    if option is False:
        return None
    kind, why = _one_pass_kind(hidden, weight, labels, ref_c, ref_r, params, backend, ignore_index, weighted,
                               softcap)
    if kind is None and option is True:
        raise ValueError(f"one_pass=True: the one pass does not apply here: {why}")
    return kind


def _one_pass_kind(hidden, weight, labels, ref_c, ref_r, params: DPOParams, backend: str, ignore_index: int,
                   weighted: bool, softcap):
    """(kind, None) where the one pass applies, else (None, the reason)."""
    if backend not in ("torch", "triton"):
        return None, f"backend {backend!r} has no one-pass path"
    if params.ld_alpha is not None:
        return None, "ld_alpha weights the tokens of a sequence unequally"
    if weighted or params.use_weighting:
        return None, "per-pair weights (use_weighting, pair_weights) take sequence_logps + dpo_loss"
    if any(r is not None and r.requires_grad for r in (ref_c, ref_r)):
        return None, "the reference log-probs require grad"
    for name, r in (("ref_chosen_logps", ref_c), ("ref_rejected_logps", ref_r)):
        if r is not None:
            _check_logps(name, r, hidden.shape[0] // 2, hidden.device)
    if (ref_c is None) != (ref_r is None):
        return None, "only one of ref_chosen_logps and ref_rejected_logps is given"   # dpo_loss raises
    if ref_c is None and not set(params.loss_types) <= set(REFERENCE_FREE_LOSSES):
        return None, f"loss_type {list(params.loss_types)} needs reference log-probs"
    if backend == "torch" and hidden.dtype not in (torch.float32, torch.float64):
        return None, f"the chunked PyTorch path's one pass runs in fp32/fp64, not {hidden.dtype}"
    kind = "pairs" if backend == "triton" else "torch_pairs"
    coupled = sorted(set(params.loss_types) & set(BATCH_LOSSES))
    fits = pair_chunks(pair_token_counts(labels, ignore_index),
                       pair_cap(kind, weight.shape[0], hidden.dtype, softcap)) is not None
    if not coupled and fits:
        return kind, None
    why = (f"{coupled} couple the pairs of a batch" if coupled else
           "a pair's fp32 logits exceed ONE_PASS_BYTES" if backend == "triton" else
           "a pair's [tokens, V] buffers exceed the chunk budget (_chunked.CHUNK_BYTES)")
    if backend == "triton":
        return None, why
    tied = tie(params.loss_types, params.f_divergence_type)      # chunked pair by pair, any length
    return tied, None if tied else (f"{why}, and the pair-by-pair pass needs a loss whose rejected gradient is "
                                    f"tied to the chosen one ({list(TIED + LENGTH_TIED)}) with reverse_kl")


class DPOLoss(torch.nn.Module):
    """``dpo_loss`` with its options held: ``DPOLoss(beta=0.1, loss_type="ipo")(pc, pr, rc, rr, ...)``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                **kwargs):
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        **{**self.options, **kwargs})


class LinearDPOLoss(torch.nn.Module):
    """``linear_dpo_loss`` with its options held: ``LinearDPOLoss(beta=0.1)(hidden, lm_head.weight, labels, rc, rr)``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, **kwargs):
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps,
                               **{**self.options, **kwargs})
