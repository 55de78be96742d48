"""Sequence parallelism (Ulysses): one micro-batch's packed row split along the sequence over the ranks of a group.

Each of the N ranks of a ``SequenceGroup`` holds the whole micro-batch (the layout is built everywhere, the same),
but runs the backbone on its own slice of the columns: ``L / N`` positions of every row (the row padded to a
multiple of N with columns no sequence holds). Everything in a decoder layer but attention works token by token.
Attention runs inside ``ulysses_attention``: an all-to-all turns the slice's query/key/value for all heads
``[R, H, L/N, d]`` into the whole row for ``H / N`` heads ``[R, H/N, L, d]``, the model's own attention function
runs on that with the mask of the *unsplit* layout (dense, span or per layer type: ``fastdpo.layout`` unchanged,
positions from the unsplit layout too), and the reverse all-to-all brings the output back to the slice for all
heads. The fused head scores the targets whose predicting hidden state lies in the rank's slice; the per-sequence
sums are partial and are added over the group (``SumOverGroup``), after which every rank holds the same log-probs
and computes the same loss.

Gradients. The all-to-all's backward is the reverse all-to-all; the sum's backward is the identity, so the loss's
gradient w.r.t. each rank's partial sums is the gradient w.r.t. the whole sum, counted once. Each rank's parameter
gradients are then the contributions of its own tokens (and, through the all-to-all, of its heads' attention):
the unsplit run's gradient is their SUM over the group. Data parallelism on top averages over the groups, so the
engine must reduce by summing over all ranks and dividing by the number of groups, not of ranks
(``fastdpo.train.dist``).

Why not DeepSpeed's ``ulysses_sp``: it drops 4D masks (it relies on position_ids and causal attention), refuses
eager attention (Gemma2's attention softcap runs eager) and rebinds the global attention table; the pair layout
needs its own masks. The collectives here are torch.distributed's (``all_to_all_single``, ``all_reduce``; gloo
has both).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._attention import _set_implementation, spans_attention
from .heads import check_layout_support, head_rule
from .layout import PackedBatch, attention_masks
from .logps import sequence_logps
from .loss import dpo_loss, ld_token_weights

NAME = "fastdpo_ulysses"
# Classes whose every parameter gradient, log-prob and loss under sequence parallelism was checked against the
# unsplit run (tests/test_sequence_parallel.py): an attention function that reads per-head parameters (sinks,
# per-head scales) or a layer that mixes tokens outside attention (state-space layers) would be wrong on a head
# subset or a slice, so other classes are refused until checked.
VERIFIED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM")
IMPLEMENTATIONS = ("eager", "sdpa")
CHECKPOINTING = ("gradient checkpointing recomputes attention in the backward, after the split attention is gone: "
                 "hold `with fastdpo.sequence_parallel.ulysses(model, group):` around the forward and the backward "
                 "(fastdpo train does)")


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that split one micro-batch's rows: ``size`` of them, this one the ``rank``-th (its columns are the
    ``rank``-th of ``size`` equal slices); ``group`` the torch.distributed process group (None: the default)."""
    group: Any
    size: int
    rank: int


# ------------------------------------------------------------------------------------------------ collectives

def _all_to_all(x: torch.Tensor, scatter: int, gather: int, sp: SequenceGroup) -> torch.Tensor:
    """Chunk ``x`` in ``sp.size`` along ``scatter``; chunk j goes to rank j; what rank i sent comes i-th along
    ``gather``."""
    send = torch.stack(x.chunk(sp.size, scatter)).contiguous()             # [N, ...chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    return torch.cat(recv.unbind(0), gather)


class AllToAll(torch.autograd.Function):
    """``_all_to_all`` with its backward: the reverse exchange (scatter along ``gather``, gather along
    ``scatter``): rank r's chunk j went to rank j as its r-th piece, so its gradient comes back from there."""

    @staticmethod
    def forward(ctx, x, scatter: int, gather: int, sp: SequenceGroup):
        ctx.dims, ctx.sp = (scatter, gather), sp
        return _all_to_all(x, scatter, gather, sp)

    @staticmethod
    def backward(ctx, grad):
        scatter, gather = ctx.dims
        return _all_to_all(grad.contiguous(), gather, scatter, ctx.sp), None, None, None


class SumOverGroup(torch.autograd.Function):
    """The sum over the group of each rank's partial per-sequence sums; backward: the identity. Every rank then
    computes the same loss from the same sums, and each seeds its own partial sums with the loss's gradient once:
    summed over the group, the parameter gradients are the unsplit run's."""

    @staticmethod
    def forward(ctx, x, sp: SequenceGroup):
        total = x.clone()
        dist.all_reduce(total, group=sp.group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ------------------------------------------------------------------------------------------------ attention

_ACTIVE: dict = {}        # id(config) -> (the attention function it selected, its SequenceGroup), inside ulysses()


def _inner(module, name: str):
    """The attention function ``name`` as ``module``'s forward would call it (eager: its modeling file's own)."""
    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"sequence parallelism: {type(module).__name__}'s module has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[name]


def ulysses_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' attention signature; query [R, H, L/N, d], key/value [R, Hkv, L/N, d] (this rank's columns)
    -> ([R, L/N, H, d], None). Inside: the model's attention over all L columns for heads [rank·H/N, (rank+1)·H/N)
    (and the key/value heads they read: H and Hkv are both split in N contiguous groups, so query head h's key/value
    head h // (H/Hkv) is in the same rank's group), with the unsplit layout's mask."""
    name, sp = _ACTIVE[id(module.config)]
    q, k, v = (AllToAll.apply(x, 1, 2, sp) for x in (query, key, value))      # [R, H/N, L, d]
    out, _ = _inner(module, name)(module, q, k, v, attention_mask, *args, **kwargs)    # [R, L, H/N, d]
    return AllToAll.apply(out.contiguous(), 1, 2, sp), None                  # [R, L/N, H, d]


def _installed(config) -> bool:
    """Whether ``config`` selects ``ulysses_attention`` (inside ``ulysses``)."""
    return getattr(config, "_attn_implementation", None) == NAME and id(config) in _ACTIVE


def _configs(model) -> list:
    return list({id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()]
                 if c is not None}.values())


@contextlib.contextmanager
def _inner_selected(model):
    """Within: the configs ``ulysses`` holds select their own attention again (for what reads the choice outside
    the forward, e.g. the mask's format)."""
    held = [c for c in _configs(model) if _installed(c)]
    for c in held:
        _set_implementation(c, _ACTIVE[id(c)][0])
    try:
        yield
    finally:
        for c in held:
            _set_implementation(c, NAME)


@contextlib.contextmanager
def ulysses(model, sp: SequenceGroup):
    """Within: every config of ``model`` that selects an attention function selects ``ulysses_attention`` around it
    (inside ``_attention.spans_attention``: around span attention). Entered again inside, it changes nothing.

    Gradient checkpointing recomputes each layer's attention in the backward, through the function its config
    selects then: with it, hold this around the forward and the backward (the span route is then off: span
    attention selects sdpa configs only)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, ulysses_attention)
    configs = {id(c): c for c in _configs(model) if getattr(c, "_attn_implementation", None) not in (None, NAME)}
    saved = {i: c._attn_implementation for i, c in configs.items()}
    for i, c in configs.items():
        _ACTIVE[i] = (saved[i], sp)
        _set_implementation(c, NAME)
    try:
        yield
    finally:
        for i, c in configs.items():
            _set_implementation(c, saved[i])
            _ACTIVE.pop(i, None)


# ------------------------------------------------------------------------------------------------ the split batch

def sequence_parallel_unavailable(model, size: int) -> Optional[str]:
    """Why ``model`` cannot be split over ``size`` ranks (None: it can)."""
    from .models import _base
    base = _base(model)
    name = type(base).__name__
    if name not in VERIFIED:
        return f"{name} is not among the classes verified under it ({', '.join(VERIFIED)})"
    config = base.config
    impl = (_ACTIVE[id(config)][0] if _installed(config) else getattr(config, "_attn_implementation", None)) or "eager"
    if impl not in IMPLEMENTATIONS:
        return f"it runs {' and '.join(IMPLEMENTATIONS)} attention (verified), not {impl!r}"
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None) or config.num_attention_heads
        if heads % size:
            return f"{field} ({heads}) must be divisible by it (each rank attends with a 1/{size} of the heads)"
    return None


def pad_columns(batch: PackedBatch, multiple: int) -> PackedBatch:
    """``batch`` with columns that no sequence holds appended to every row, up to a multiple of ``multiple``
    (never attended to, never scored); the targets' flat indices moved to the wider rows."""
    R, L = batch.input_ids.shape
    extra = -L % multiple
    if not extra:
        return batch
    row, col = batch.index.div(L, rounding_mode="floor"), batch.index.remainder(L)
    return PackedBatch(F.pad(batch.input_ids, (0, extra), value=0), F.pad(batch.position_ids, (0, extra)),
                       F.pad(batch.sequence, (0, extra), value=-1), F.pad(batch.part, (0, extra), value=-1),
                       row * (L + extra) + col, batch.labels)


def local_targets(batch: PackedBatch, sp: SequenceGroup):
    """The targets of ``batch`` (its columns a multiple of ``sp.size``) predicted in this rank's columns, packed to
    the left of each sequence's row: (flat index into the rank's [R · L/N] hidden states [2B, T'], labels [2B, T']
    (-100 after each sequence's own), the position in ``batch.labels`` each came from [2B, T'])."""
    R, L = batch.input_ids.shape
    width = L // sp.size
    col = batch.index.remainder(L)
    local = batch.index.div(L, rounding_mode="floor") * width + col.remainder(width)
    mine = (batch.labels != -100) & (col.div(width, rounding_mode="floor") == sp.rank)
    T = max(1, int(mine.sum(1).max()))
    order = torch.sort((~mine).to(torch.int8), dim=1, stable=True).indices[:, :T]     # this rank's first, in order
    keep = mine.gather(1, order)
    return (local.gather(1, order).masked_fill(~keep, 0), batch.labels.gather(1, order).masked_fill(~keep, -100),
            order)


def _local_hidden(model, batch: PackedBatch, attention: str, sp: SequenceGroup):
    """One backbone pass over this rank's columns -> (hidden states predicting its targets [2B, T', D], labels
    [2B, T'], their positions in ``batch.labels``). ``batch`` already padded (``pad_columns``)."""
    from .models import _base, _check_span_calls, _checkpointing, _mask_dtype, _span_route
    base = _base(model)
    check_layout_support(base)
    why = sequence_parallel_unavailable(base, sp.size)
    if why is None and base.training and _checkpointing(base) and not _installed(base.config):
        why = CHECKPOINTING
    if why:
        raise ValueError(f"sequence parallelism over {sp.size} ranks: {why}")
    backbone = head_rule(base).backbone_of(base)
    device = batch.input_ids.device
    held = _installed(base.config)       # around the backward too (gradient checkpointing): never span
    with _inner_selected(base):
        by_span = not held and _span_route(base, device.type, attention)
        masks = attention_masks(batch, base.config, _mask_dtype(base, device.type), with_spans=by_span)
    width = batch.input_ids.shape[1] // sp.size
    cols = slice(sp.rank * width, (sp.rank + 1) * width)
    with spans_attention(base) if by_span else contextlib.nullcontext(), ulysses(base, sp):
        out = backbone(input_ids=batch.input_ids[:, cols], attention_mask=masks,
                       position_ids=batch.position_ids[:, cols], use_cache=False)
    _check_span_calls(base, masks)
    hidden = out.last_hidden_state
    index, labels, order = local_targets(batch, sp)
    return hidden.reshape(-1, hidden.shape[-1])[index], labels, order


def model_pair_logps(model, batch: PackedBatch, *, group: SequenceGroup, average: bool = False,
                     backend: str = "auto", attention: str = "auto") -> torch.Tensor:
    """``fastdpo.model_pair_logps`` of a PackedBatch split over ``group`` (every rank calls it with the same batch;
    every rank gets all [2B] log-probs)."""
    from .models import _fused
    batch = pad_columns(batch, group.size)
    hidden, labels, _ = _local_hidden(model, batch, attention, group)
    logps = SumOverGroup.apply(_fused(model, hidden, labels, functools.partial(sequence_logps, backend=backend)),
                               group)
    if average:
        logps = logps / (batch.labels != -100).sum(1).clamp(min=1)
    return logps


def model_pair_dpo_loss(model, batch: PackedBatch, ref_chosen_logps=None, ref_rejected_logps=None, *,
                        group: SequenceGroup, attention: str = "auto", return_logps: bool = False,
                        backend: str = "auto", ld_alpha: Optional[float] = None, use_weighting: bool = False,
                        **loss_options):
    """``fastdpo.model_pair_dpo_loss`` of a PackedBatch split over ``group``: the policy's log-probs summed over the
    group (differentiably), then ``dpo_loss`` (lengths from the whole batch's labels). ``ld_alpha`` weights each
    token by its place in the whole sequence; ``use_weighting`` (WPO) is refused."""
    from .models import _fused
    if use_weighting:
        raise ValueError("sequence parallelism: use_weighting (WPO) is not supported")
    batch = pad_columns(batch, group.size)
    hidden, labels, order = _local_hidden(model, batch, attention, group)
    if ld_alpha is None:
        op = functools.partial(sequence_logps, backend=backend)
    else:
        weights = ld_token_weights(batch.labels, ld_alpha).gather(1, order)          # [2B, T'] of the whole rows

        def op(h, w, y, **options):
            _, token = sequence_logps(h, w, y, return_token_logps=True, backend=backend, **options)
            return (token * weights).sum(1)          # token: 0 where this rank scores nothing
    logps = SumOverGroup.apply(_fused(model, hidden, labels, op), group)                # [2B]
    lengths = (batch.labels != -100).sum(1).to(logps.dtype)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    loss, metrics = dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_lengths=lc, rejected_lengths=lr,
                             backend=backend, **loss_options)
    return (loss, metrics, logps.detach()) if return_logps else (loss, metrics)
