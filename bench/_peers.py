"""The methods bench/compare.py times, each as a DPO sigmoid loss on one shared problem.

A method takes a ``Problem`` and returns the scalar loss; its backward fills
``hidden.grad`` and ``weight.grad``. Every method except Liger turns per-sequence
log-probs into the same loss,

    loss = -mean(logsigmoid(beta * ((pc - pr) - (ref_c - ref_r)))),

with the chosen rows first in the batch, then the rejected rows (DESIGN.md).
Liger computes the DPO loss itself and accepts no precomputed reference
log-probs (only a reference model's hidden states and weight), so it runs
reference-free: the reference only shifts the margin by a constant, so the
work is the same but its loss value differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
BETA = 0.1
TRL_VOCAB_CHUNK = 32768  # TRL's trainer default (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


class Unsupported(Exception):
    """The method cannot run this problem (e.g. no softcap option); reported as n/a."""


@dataclass(frozen=True)
class Problem:
    hidden: torch.Tensor        # [2P, T, D], requires grad; P chosen rows, then P rejected rows
    weight: torch.Tensor        # [V, D], requires grad
    labels: torch.Tensor        # [2P, T] int64, IGNORE_INDEX where not scored
    ref_chosen: torch.Tensor    # [P] float32
    ref_rejected: torch.Tensor  # [P] float32
    softcap: Optional[float] = None


@dataclass(frozen=True)
class Method:
    title: str
    loss: Callable[[Problem], torch.Tensor]
    package: str                # distribution whose version the header reports
    products: dict              # device type -> matmul work per fwd+bwd, read from the source
    note: str = ""
    env: tuple = ()             # (name, value) environment settings while the method runs (fastdpo's switches)
    same_loss: bool = True      # computes the shared loss (its gradient error against float64 is meaningful)


def dpo_sigmoid_loss(logps: torch.Tensor, pb: Problem) -> torch.Tensor:
    """logps [2P] (chosen first) -> scalar sigmoid DPO loss (float32, float64 for float64 log-probs)."""
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    chosen, rejected = logps.to(dtype).chunk(2)
    margin = (chosen - rejected) - (pb.ref_chosen - pb.ref_rejected).to(dtype)
    return -F.logsigmoid(BETA * margin).mean()


def fastdpo_loss(pb: Problem, **options) -> torch.Tensor:
    import fastdpo

    logps = fastdpo.sequence_logps(pb.hidden, pb.weight, pb.labels, ignore_index=IGNORE_INDEX, softcap=pb.softcap,
                                   **options)
    return dpo_sigmoid_loss(logps, pb)


def fastdpo_unfiltered_loss(pb: Problem) -> torch.Tensor:
    return fastdpo_loss(pb, filter_eps=None)


def fastdpo_linear_loss(pb: Problem, **options) -> torch.Tensor:
    from fastdpo.loss import linear_dpo_loss

    loss, _metrics = linear_dpo_loss(pb.hidden, pb.weight, pb.labels, pb.ref_chosen, pb.ref_rejected, beta=BETA,
                                     ignore_index=IGNORE_INDEX, softcap=pb.softcap, **options)
    return loss


def fastdpo_one_pass_loss(pb: Problem) -> torch.Tensor:
    return fastdpo_linear_loss(pb, one_pass=True)


def naive_loss(pb: Problem) -> torch.Tensor:
    from fastdpo import reference

    logps = reference.sequence_logps(pb.hidden, pb.weight, pb.labels, ignore_index=IGNORE_INDEX,
                                     softcap=pb.softcap)
    return dpo_sigmoid_loss(logps, pb)


def trl_loss(pb: Problem) -> torch.Tensor:
    """TRL's chunked log-probs on the scored tokens only, as TRL's fused LM head does on CUDA."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    mask = pb.labels != IGNORE_INDEX                                      # [2P, T]
    token_logps, *_ = ChunkedLogProbFunction.apply(
        pb.hidden[mask], pb.weight, None, pb.labels[mask],                # [N, D], [V, D], bias, [N]
        1.0, TRL_VOCAB_CHUNK, pb.softcap, 1.0, ())                        # temperature, chunk, softcap, scale, outputs
    dense = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)
    return dpo_sigmoid_loss(dense.sum(-1), pb)


def cce_loss(pb: Problem) -> torch.Tensor:
    """CCE's per-token NLL (zero where ignored), negated and summed per sequence."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if pb.hidden.is_cuda else "torch_compile"
    nll = linear_cross_entropy(pb.hidden, pb.weight, pb.labels, ignore_index=IGNORE_INDEX, softcap=pb.softcap,
                               reduction="none", impl=impl)               # [2P, T]
    # (-nll).sum, not -(nll.sum): CCE's backward calls grad_out.view(-1), which fails on the
    # expanded gradient that a sum hands back; the negation makes it a dense tensor
    return dpo_sigmoid_loss((-nll).sum(-1), pb)


def liger_loss(pb: Problem) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    if pb.softcap is not None:
        raise Unsupported("no softcap option")
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False)
    loss, _metrics = loss_fn(pb.weight, pb.hidden, pb.labels)
    return loss


VOCAB, TILES = (("FASTDPO_BWD", "vocab"),), (("FASTDPO_FWD", "tiles"), ("FASTDPO_BWD", "vocab"))
FUSED = (("FASTDPO_BWD", "fused"),)
SEQ, LOSS = "4 × scored", ("3 × scored (one pass)", "4 × scored")      # fastdpo's products: (CPU, CUDA)


def _fastdpo(title: str, loss, products=(SEQ, SEQ), env=()) -> Method:
    return Method(f"fastdpo {title}", loss, "fastdpo", {"cpu": products[0], "cuda": products[1]}, env=env)


METHODS = {
    "fastdpo": _fastdpo("`sequence_logps`", fastdpo_loss),
    "fastdpo_vocab": _fastdpo("`sequence_logps`, FASTDPO_BWD=vocab", fastdpo_loss, env=VOCAB),
    "fastdpo_tiles": _fastdpo("`sequence_logps`, FASTDPO_FWD=tiles FASTDPO_BWD=vocab", fastdpo_loss, env=TILES),
    "fastdpo_fused": _fastdpo("`sequence_logps`, FASTDPO_BWD=fused, filter_eps auto", fastdpo_loss,
                              (SEQ, "≤ 4 × scored (gradient filtering)"), FUSED),
    "fastdpo_unfiltered": _fastdpo("`sequence_logps`, FASTDPO_BWD=fused, filter_eps None", fastdpo_unfiltered_loss,
                                   env=FUSED),
    "fastdpo_loss": _fastdpo("`loss.linear_dpo_loss`", fastdpo_linear_loss, LOSS),
    "fastdpo_loss_1p": _fastdpo("`loss.linear_dpo_loss`, one_pass=True", fastdpo_one_pass_loss,
                                (LOSS[0], LOSS[0])),
    "fastdpo_loss_tiles": _fastdpo("`loss.linear_dpo_loss`, FASTDPO_FWD=tiles FASTDPO_BWD=vocab",
                                   fastdpo_linear_loss, LOSS, TILES),
    "naive": Method(
        "naive PyTorch (`fastdpo.reference`)", naive_loss, "torch",
        {"cpu": "3 × all", "cuda": "3 × all"}),
    "trl": Method(
        "TRL `ChunkedLogProbFunction`", trl_loss, "trl",
        {"cpu": "4 × scored", "cuda": "4 × scored"},
        note="scored tokens only (`hidden[mask]`)"),
    "liger": Method(
        "Liger `LigerFusedLinearDPOLoss`", liger_loss, "liger-kernel",
        {"cpu": "3 × all", "cuda": "3 × all"},
        note="reference-free: API takes no ref log-probs", same_loss=False),
    "cce": Method(
        "CCE `linear_cross_entropy`", cce_loss, "cut-cross-entropy",
        {"cpu": "3 × scored", "cuda": "≤ 3 × scored (gradient filtering)"},
        note="CPU: impl=torch_compile (compiled naive; logits materialized)"),
}
