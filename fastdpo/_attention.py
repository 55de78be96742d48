"""Attention of a packed/shared batch span by span: only the blocks its mask allows, each through plain SDPA.

``layout.attention_masks`` hands a Hugging Face backbone one dense additive mask per layer type; on the CPU it also
pins to each mask its ``Spans``: per row, the sequences it holds, each ``(start, causal, shared, rejected)`` columns
— the first ``causal`` columns (prompt and chosen reply, or a whole unshared sequence) attend causally among
themselves, the next ``rejected`` columns to the first ``shared`` (the prompt) and causally to themselves. Inside
``spans_attention(model)`` the model's attention layers run ``span_attention``, which computes exactly those blocks:
a causal SDPA per [prompt, chosen] and one small masked SDPA per rejected reply, instead of the full [L, L] product
with most of it masked (CPU, 2 pairs of ~470 tokens: the dense masked kernel computes 2.3x the blocks, and without
``is_causal``). Anything it does not cover (no Spans pinned, position bias, softcapped or sink attention, a
non-causal module) goes to transformers' own SDPA with the dense mask, which is exact for any consumer: the mask
the backbone receives is the real one, Spans only say where its zeros are.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

NAME = "fastdpo_spans"
_HANDLED = {"sliding_window", "output_attentions", "cache_position", "position_ids", "position_embeddings",
            "use_cache", "cache", "past_key_values"}


@dataclass(eq=False)
class Spans:
    rows: tuple                   # per row: ((start, causal, shared, rejected), ...) in column order
    length: int                   # L, the columns of a row
    window: Optional[int]         # sliding window (positions), or None
    dense: Callable               # () -> the dense additive [R, 1, L, L] mask (for what span_attention leaves to sdpa)
    masks: dict = field(default_factory=dict)   # the small masks, built once and shared by the layers
    calls: int = 0                # attention layers that ran through span_attention


def span_mask(rows: tuple, shape: tuple, window, dense: Callable, dtype, device) -> torch.Tensor:
    """The mask argument for a backbone inside ``spans_attention``: a [R, 1, L, L] placeholder that holds no memory
    (one NaN, expanded) with its Spans pinned as ``fastdpo_spans``. An attention that is not span_attention adds
    NaN to every score, so it cannot silently attend to everything; span_attention raises if it gets the
    placeholder without the Spans."""
    mask = torch.full((1, 1, 1, 1), float("nan"), dtype=dtype, device=device).expand(shape)
    mask.fastdpo_spans = Spans(rows, shape[-1], window, dense)
    return mask


def span_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   position_bias=None, **kwargs):
    """transformers' attention signature: query/key/value [R, H(kv), L, d] -> ([R, L, H, d], None)."""
    spans = getattr(attention_mask, "fastdpo_spans", None)
    if spans is None:
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.numel() > 1
                and attention_mask.untyped_storage().nbytes() <= attention_mask.element_size()
                and bool(attention_mask.flatten()[0].isnan())):
            raise ValueError("fastdpo's span-attention placeholder mask reached the attention without its spans "
                             "(did the model copy or slice the mask?); use the dense mask (fastdpo.layout."
                             "attention_masks without with_spans)")
        return _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, kwargs)
    if (position_bias is not None or is_causal is False or not getattr(module, "is_causal", True)
            or any(v is not None and k not in _HANDLED for k, v in kwargs.items())
            or query.shape[2] != spans.length or key.shape[2] != spans.length
            or kwargs.get("sliding_window") not in (None, spans.window)):
        spans.calls += 1
        if "dense" not in spans.masks:
            spans.masks["dense"] = spans.dense()
        return _dense(module, query, key, value, spans.masks["dense"], dropout, scaling, is_causal, position_bias,
                      kwargs)
    spans.calls += 1
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    rows = []
    for q_row, k_row, v_row, spans_row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans.rows):
        plan, sizes, end = [], [], 0      # plan: None for columns no sequence holds, else (shared, rejected)
        for start, causal, shared, rejected in spans_row:
            if start > end:
                plan.append(None)
                sizes.append(start - end)
            plan.append((shared, rejected))
            sizes += [causal] + ([rejected] if rejected else [])
            end = start + causal + rejected
        if end < spans.length:
            plan.append(None)
            sizes.append(spans.length - end)
        qs, ks, vs = (x.split(sizes, dim=1) for x in (q_row, k_row, v_row))
        pieces, i = [], 0
        for step in plan:
            if step is None:
                pieces.append(torch.zeros_like(vs[i]))
                i += 1
                continue
            shared, rejected = step
            pieces.append(_causal(qs[i], ks[i], vs[i], spans, dropout, scaling))
            if rejected:
                pieces.append(_rejected(qs[i + 1], ks[i][:, :shared], ks[i + 1], vs[i][:, :shared], vs[i + 1],
                                        spans, dropout, scaling))
            i += 2 if rejected else 1
        rows.append(torch.cat(pieces, 1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _dense(module, query, key, value, mask, dropout, scaling, is_causal, position_bias, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias, **kwargs)


def _sdpa(q, k, v, mask, dropout, scaling, causal=False):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout,
                                          scale=scaling, is_causal=causal)[0]


def additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool "may attend" -> the additive mask in ``dtype``: 0 where allowed, the dtype's lowest value elsewhere."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def _small_mask(spans: Spans, key, build, dtype) -> torch.Tensor:
    """An additive mask built once per shape and dtype for all layers (one copy kept for the backward)."""
    key = (*key, dtype)
    if key not in spans.masks:
        spans.masks[key] = additive(build(), dtype)
    return spans.masks[key]


def _causal(q, k, v, spans, dropout, scaling):
    n, w = q.shape[1], spans.window
    if w is None or n <= w:
        return _sdpa(q, k, v, None, dropout, scaling, causal=True)

    def build():
        t = torch.arange(n, device=q.device)
        d = t[:, None] - t[None, :]
        return (d >= 0) & (d < w)
    return _sdpa(q, k, v, _small_mask(spans, ("causal", n), build, q.dtype), dropout, scaling)


def _rejected(q, k_prompt, k_rej, v_prompt, v_rej, spans, dropout, scaling):
    """Rejected queries (positions shared + t) over the prompt's keys (positions 0..shared-1), then their own."""
    n, shared, w = q.shape[1], k_prompt.shape[1], spans.window

    def build():
        t = torch.arange(n, device=q.device)
        j = torch.arange(shared, device=q.device)
        return torch.cat([(shared + t[:, None] - j[None, :] < (w or shared + n)).expand(n, shared),
                          (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < (w or n))], 1)
    mask = _small_mask(spans, ("rejected", n, shared), build, q.dtype)
    return _sdpa(q, torch.cat([k_prompt, k_rej], 1), torch.cat([v_prompt, v_rej], 1), mask, dropout, scaling)


def available() -> bool:
    """transformers lets a custom attention function be registered (AttentionInterface, 4.48 and later)."""
    try:
        from transformers import AttentionInterface  # noqa: F401
    except ImportError:
        return False
    return True


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, span_attention)


def _set_implementation(config, value: str) -> None:
    """This config only: transformers' property setter would also set every sub-config to ``value``."""
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


@contextlib.contextmanager
def spans_attention(model):
    """Within: every config of ``model`` that selects sdpa selects ``span_attention`` instead (restored after)."""
    _register()
    configs = {id(c): c for c in [getattr(model, "config", None)] + [getattr(m, "config", None)
                                                                      for m in model.modules()]
               if c is not None and getattr(c, "_attn_implementation", None) == "sdpa"}
    for c in configs.values():
        _set_implementation(c, NAME)
    try:
        yield
    finally:
        for c in configs.values():
            _set_implementation(c, "sdpa")
