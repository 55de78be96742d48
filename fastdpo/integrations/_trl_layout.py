"""FastDPOTrainer's pair layout: TRL's tokenized pairs laid out as ``fastdpo train`` lays them out.

TRL's ``DataCollatorForPreference`` pads ``[prompt + chosen; prompt + rejected]`` (each truncated to ``max_length``
per ``truncation_mode``). ``PairCollator`` truncates exactly as it does, then builds fastdpo's layout from the same
tokens (``fastdpo.layout``: one sequence ``[prompt, chosen, rejected]`` per pair, pairs packed without padding, or the
prompt cache for long pairs): each prompt runs once, and the log-probs are the padded layout's (rounding apart).
A batch the layout cannot hold exactly (a reply truncated to nothing, or ``keep_end`` cutting the chosen and the
rejected sequence's prompts differently) is collated by TRL's collator, and runs padded.

The route is chosen as ``fastdpo train``'s ``resolve_layout``: on for the classes ``fastdpo.heads.supports_layout``
verifies, with attention that takes a custom mask and no MoE load-balancing loss; span attention on the CPU where
``fastdpo.models.span_unavailable`` finds nothing missing (one row per micro-batch), else the dense mask; the prompt
cache for long pairs (``fastdpo.layout.prefers_prompt_cache``) where neither span attention nor gradient
checkpointing is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import sequence_parallel
from ..heads import supports_layout
from ..layout import mask_unavailable, pack_pairs, prefers_prompt_cache, prompt_cache_batch
from ..models import model_pair_dpo_loss, model_pair_logps, span_unavailable

KEY = "fastdpo_pairs"           # the batch key holding a PackedBatch or CacheBatch
POSITIONS = "fastdpo/positions"  # logged: positions the backbone computed (padding included), summed over processes
PADDED = "fastdpo_padded_tokens"  # the batch key: what TRL's padded batch's input_ids would hold (numel)


@dataclass(frozen=True)
class PairLayout:
    span: bool              # span attention (one packed row per micro-batch), else the dense mask
    prompt_cache: bool      # the prompt cache allowed for long pairs


def layout_unavailable(model, aux_loss: bool) -> Optional[str]:
    """Why the pair layout cannot run for ``model`` (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    if not supports_layout(base):
        return f"{type(base).__name__} is not among the classes verified for it (fastdpo.heads.LAYOUT_CLASSES)"
    if aux_loss:
        return "the MoE load-balancing loss (router_aux_loss_coef) is TRL's over the padded pairs"
    return mask_unavailable(impl, "cuda" if torch.cuda.is_available() else "cpu")    # where TRL will run it


def resolve(models, args, device: torch.device, split: bool = False) -> PairLayout:
    """The route for the policy and reference ``models``: span attention where both can take it; no prompt cache
    where the rows are ``split`` over a sequence-parallel group (``fastdpo.sequence_parallel`` splits packed rows)."""
    checkpointing = bool(args.gradient_checkpointing)
    span = device.type == "cpu" and all(span_unavailable(m, checkpointing) is None for m in models)
    return PairLayout(span=span, prompt_cache=not span and not checkpointing and not split)


def _truncate(ids: list, mask: list, max_length, mode: str):
    """TRL's per-sequence truncation, as DataCollatorForPreference does it."""
    if max_length is None:
        return ids, mask
    sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[sl], mask[sl]


def _split(ids: list, mask: list):
    """(prompt tokens, completion tokens) of one truncated sequence; None where they do not lie in that order."""
    n = mask.count(0)
    return (ids[:n], ids[n:]) if all(m == 0 for m in mask[:n]) else None


class PairCollator:
    """TRL's examples (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optionally ``ref_*_logps``) -> a batch
    {KEY: PackedBatch | CacheBatch, "num_tokens": what TRL's attention mask would sum to, PADDED: its input_ids'
    numel, ref log-probs}, or TRL's
    padded batch (``fallback``) where the layout cannot hold the truncated pairs exactly."""

    def __init__(self, fallback, layout: PairLayout):
        if fallback.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"Unsupported truncation mode: {fallback.truncation_mode}, expected 'keep_start' or "
                             "'keep_end'")
        self.fallback, self.layout = fallback, layout

    def __call__(self, examples: list) -> dict:
        f = self.fallback
        pairs, tokens = [], 0
        for e in examples:
            p = list(e["prompt_ids"])
            halves = [_split(*_truncate(p + list(e[k]), [0] * len(p) + [1] * len(e[k]), f.max_length,
                                        f.truncation_mode)) for k in ("chosen_ids", "rejected_ids")]
            if any(h is None or not h[1] for h in halves) or halves[0][0] != halves[1][0]:
                return f(examples)
            (prompt, chosen), (_, rejected) = halves
            pairs.append((prompt, chosen, rejected))
            tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        if self.layout.prompt_cache and min(len(p) for p, _, _ in pairs) and prefers_prompt_cache(pairs):
            batch = prompt_cache_batch(pairs, f.pad_token_id)
        else:
            row = sum(len(p) + len(c) + len(r) for p, c, r in pairs) if self.layout.span else None
            batch = pack_pairs(pairs, f.pad_token_id, max_tokens=row)
        longest = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
        if f.pad_to_multiple_of:
            longest = -(-longest // f.pad_to_multiple_of) * f.pad_to_multiple_of
        out = {KEY: batch, "num_tokens": torch.tensor(tokens), PADDED: torch.tensor(2 * len(pairs) * longest)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([e[key] for e in examples])
        return out


def is_layout_batch(inputs) -> bool:
    return KEY in inputs


def positions(inputs) -> int:
    """Positions the backbone computes for one batch (padding included), either layout."""
    batch = inputs.get(KEY)
    return batch.tokens if batch is not None else inputs["input_ids"].numel()


def num_tokens(inputs) -> torch.Tensor:
    """What TRL counts as a batch's tokens: its padded batch's attention mask, summed."""
    return inputs["num_tokens"] if KEY in inputs else inputs["attention_mask"].sum()


def input_tokens(inputs, mode: str) -> torch.Tensor:
    """Transformers' ``include_num_input_tokens_seen`` count of a layout batch, as it counts TRL's padded batch:
    ``"non_padding"`` its attention mask summed, ``"all"`` its input_ids' numel."""
    return inputs["num_tokens"] if mode == "non_padding" else inputs[PADDED]


def pair_dpo_loss(model, inputs, layout: PairLayout, ref_chosen=None, ref_rejected=None, *, group=None,
                  **loss_options):
    """``model_pair_dpo_loss`` on a layout batch, on the model's device, with the route the layout was built for;
    split over ``group`` (a ``fastdpo.sequence_parallel.SequenceGroup``) where given."""
    batch = inputs[KEY].to(next(model.parameters()).device)
    attention = "span" if layout.span else "dense"
    if group is not None:
        return sequence_parallel.model_pair_dpo_loss(model, batch, ref_chosen, ref_rejected, group=group,
                                                     attention=attention, **loss_options)
    return model_pair_dpo_loss(model, batch, ref_chosen, ref_rejected, attention=attention, **loss_options)


def pair_logps(model, inputs, layout: PairLayout, ld_alpha=None, group=None) -> torch.Tensor:
    """[2B] log-probs of a layout batch (LD-DPO-weighted under ``ld_alpha``, as TRL's), split over ``group`` where
    given."""
    if ld_alpha is None:
        batch = inputs[KEY].to(next(model.parameters()).device)
        attention = "span" if layout.span else "dense"
        if group is not None:
            return sequence_parallel.model_pair_logps(model, batch, group=group, attention=attention)
        return model_pair_logps(model, batch, attention=attention)
    # model_pair_dpo_loss's log-probs are the LD-weighted ones (its reference-free loss is dropped)
    return pair_dpo_loss(model, inputs, layout, ld_alpha=ld_alpha, return_logps=True, group=group)[2]
