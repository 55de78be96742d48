"""Hugging Face causal LMs through the fused head: the backbone runs, the output head's logits are left to the
fused op, so ``[tokens, vocab]`` never exists.

``model_sequence_logps`` equals the plain path (``model(...).logits`` -> log_softmax -> gather -> masked sum)
for every family in ``fastdpo.heads.HEADS``: what each family's forward does to the lm_head output (scaling,
softcapping) is read from the attributes that forward reads; the lm_head's bias, tied weights and PEFT LoRA on
the lm_head go into the fused product. A head the table does not know raises instead of computing something else.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from . import _attention
from ._attention import spans_attention
from .heads import (accept_probed, check_layout_support, head_rule, known_rule, model_class, probe_rule,
                    router_experts, unknown_head)
from .layout import CacheBatch, PackedBatch, attention_masks
from .logps import sequence_logps
from .loss import linear_dpo_loss


@dataclass(frozen=True)
class Head:
    """What the fused op needs besides the hidden states: logits = softcap·tanh((h'·w + b)·logit_scale/softcap).

    With LoRA on the lm_head, ``h' = [h, s·A·dropout(h)]`` and ``w = [W, B]`` (D + r columns): the adapter's
    term sits inside the same product. ``extend`` builds h' from the backbone's h."""
    weight: torch.Tensor                 # [V, D'] (D' = D + the LoRA ranks)
    bias: Optional[torch.Tensor]         # [V] or None
    logit_scale: float
    softcap: Optional[float]
    lora: tuple = ()                     # ((lora_A module, dropout module, scaling), ...)

    def extend(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.lora:
            return hidden
        return torch.cat([hidden] + [s * a(drop(hidden)) for a, drop, s in self.lora], dim=-1)

    def options(self) -> dict:
        return dict(bias=self.bias, logit_scale=self.logit_scale, softcap=self.softcap)


def _base(model):
    """The transformers model under a PEFT wrapper (PeftModel.get_base_model), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_parts(module, where: str):
    """(weight, bias, lora terms) of an output layer that is a plain linear map, a PEFT LoRA layer around one,
    or a PEFT modules_to_save copy of one. Anything else raises."""
    cls = type(module).__name__
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):       # peft ModulesToSaveWrapper
        inner = module.original_module if module.disable_adapters else module.modules_to_save[module.active_adapter]
        return _linear_parts(inner, where)
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):                     # peft LoRA layer
        weight, bias, lora = _linear_parts(module.base_layer, where)
        if module.disable_adapters or module.merged:
            return weight, bias, lora
        extra_w, extra_b = [weight], [] if bias is None else [bias]
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
                raise ValueError(f"{where}: the LoRA variant of adapter {name!r} on the output layer (DoRA and the "
                                 "like) is not a plain low-rank term; fastdpo cannot fuse it")
            a, b, s = module.lora_A[name], module.lora_B[name], module.scaling[name]
            if model_class(a) is not torch.nn.Linear or model_class(b) is not torch.nn.Linear:
                raise ValueError(f"{where}: LoRA adapter {name!r} on the output layer is not made of linear maps")
            lora = lora + ((a, module.lora_dropout[name], s),)
            extra_w.append(b.weight)
            if b.bias is not None:                  # peft lora_bias: B(z) = z·Bᵀ + b_B, scaled by s
                extra_b.append(s * b.bias)
        weight = torch.cat(extra_w, dim=1) if len(extra_w) > 1 else weight
        bias = None if not extra_b else (extra_b[0] if len(extra_b) == 1 else torch.stack(extra_b).sum(0))
        return weight, bias, lora
    if model_class(module) is torch.nn.Linear:           # (FSDP2: the FSDPLinear fully_shard made of it)
        return module.weight, module.bias, ()
    raise ValueError(f"{where}: the output layer is a {cls}, not a plain linear map; fastdpo cannot fuse it "
                     "(quantized and custom heads are not supported)")


def output_head(model) -> Head:
    """The fused-op view of ``model``'s output head (see ``fastdpo.heads`` for what each family does)."""
    base = _base(model)
    rule = head_rule(base)
    module = base.get_output_embeddings()
    if module is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (get_output_embeddings() is None)")
    weight, bias, lora = _linear_parts(module, type(base).__name__)
    scale, softcap = rule.transform(base)
    return Head(weight, bias, scale, softcap, lora)


def _backbone_outputs(model, input_ids, attention_mask=None, position_ids=None, rule=None, **extra):
    """The backbone's outputs for the family's forward (``rule``: the head rule, default the model's)."""
    base = _base(model)
    backbone = (rule or head_rule(base)).backbone_of(base)
    accepts = inspect.signature(backbone.forward).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
    kwargs = dict(input_ids=input_ids)
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids), *extra.items()):
        if value is None:
            continue
        if name not in accepts and not takes_any:
            raise ValueError(f"{type(base).__name__}'s backbone takes no {name}")
        kwargs[name] = value
    if "use_cache" in accepts:
        kwargs["use_cache"] = False                 # no key/value cache: scoring, not generating
    return backbone(**kwargs)


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def backbone_hidden(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """[B, L, D] last hidden states of the backbone the family's forward runs before its lm_head."""
    return _last_hidden(_backbone_outputs(model, input_ids, attention_mask, position_ids))


def router_aux_loss(model, router_logits, attention_mask=None) -> torch.Tensor:
    """The MoE load-balancing loss of one forward's router logits, as TRL's DPOTrainer computes it (see
    ``fastdpo.heads.router_aux_loss_coef``): Mixtral's load_balancing_loss_func over the tokens attention_mask
    keeps (all without one)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    num_experts, top_k = router_experts(_base(model))
    if not isinstance(router_logits, tuple) or not router_logits:
        raise ValueError(f"{type(_base(model)).__name__}'s backbone returned no router logits with "
                         "output_router_logits=True")
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def _check_ids(input_ids, labels, attention_mask, position_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be an integer tensor [B, L]")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have at least 2 positions (the first token is never scored), got shape "
                         f"{tuple(input_ids.shape)}")
    for name, t in (("labels", labels), ("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is None and name != "labels":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)} (Hugging "
                             f"Face style: not shifted), got {got}")


@contextlib.contextmanager
def _fused_precision(device_type: str):
    """The fused op keeps its own precision (fp32 accumulation): autocast is off inside it."""
    with torch.autocast(device_type, enabled=False):
        yield


def _head_owners(module) -> list:
    """The modules whose own parameters the fused product reads (as ``_linear_parts`` walks the output layer): the
    linear map and its LoRA B maps. Not the LoRA A maps: the fused head calls those itself."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):       # peft ModulesToSaveWrapper
        return _head_owners(module.original_module if module.disable_adapters
                            else module.modules_to_save[module.active_adapter])
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):                     # peft LoRA layer
        owners = _head_owners(module.base_layer)
        if not (module.disable_adapters or module.merged):
            owners += [module.lora_B[name] for name in module.active_adapters if name in module.lora_A]
        return owners
    return [module]


def head_call(model, hidden: torch.Tensor, fn):
    """``fn(hidden)``, computed inside the forward of every module that owns a parameter of ``model``'s output head.

    The one place that knows about distributed engines. DeepSpeed ZeRO-3 and FSDP gather a sharded parameter in the
    pre-forward hook of the module that owns it, gather it again before that module's backward (hooks on its
    outputs) and reduce its gradient after (hooks on its inputs). The fused head reads ``lm_head.weight`` without
    calling ``lm_head``; run inside ``lm_head``'s own call (its ``forward`` swapped for ``fn`` for that call, the
    hidden states as its input, ``fn``'s result as its output), the engine's hooks do for it what they do for the
    plain head. Without an engine the call is a plain module call."""
    owners = _head_owners(_base(model).get_output_embeddings())

    def enter(i: int, h: torch.Tensor):
        if i == len(owners):
            return fn(h)
        module = owners[i]
        own = module.__dict__.get("forward")             # an instance-level forward (e.g. accelerate's hooks)
        module.forward = lambda x: enter(i + 1, x)
        try:
            return module(h)
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own

    return enter(0, hidden)


def _fused_inputs(model, hidden, labels):
    """(hidden [B, T, D'], weight, fused-op options, labels) from the backbone's hidden states [B, T, D], with the
    head's LoRA columns and autocast applied as ``F.linear`` would apply it to the lm_head."""
    head = output_head(model)
    hidden = head.extend(hidden)
    weight, options = head.weight, head.options()
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        if options["bias"] is not None:
            options["bias"] = options["bias"].to(dtype)
    return hidden, weight, options, labels


def _fused(model, hidden, labels, op):
    """``op(hidden', weight, labels, **options)`` of the output head (``_fused_inputs``), inside ``head_call``."""
    def run(h):
        h, weight, options, y = _fused_inputs(model, h, labels)
        with _fused_precision(h.device.type):
            return op(h, weight, y, **options)
    return head_call(model, hidden, run)


def _head_inputs(model, input_ids, labels, attention_mask, position_ids, router_logits=False):
    """The backbone's hidden states and the labels of a plain batch, shifted (hidden[:, t] predicts
    labels[:, t + 1]); with ``router_logits``, the backbone's router logits too (a third item)."""
    _check_ids(input_ids, labels, attention_mask, position_ids)
    extra = dict(output_router_logits=True) if router_logits else {}
    out = _backbone_outputs(model, input_ids, attention_mask, position_ids, **extra)
    hidden, shifted = _last_hidden(out)[:, :-1], labels[:, 1:]
    return (hidden, shifted, out.router_logits) if router_logits else (hidden, shifted)


def model_sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, *,
                         attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                         average: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-sequence log-probs [B] (float32) of a Hugging Face causal LM, through its backbone and the fused head.

    Equal to ``log_softmax(model(input_ids, ...).logits)`` gathered at the labels and summed (``average=True``:
    averaged) over the scored positions, without the logits. ``labels`` as in Hugging Face: shaped like
    ``input_ids``, -100 where not scored, shifted inside (``labels[:, t]`` is predicted at position t - 1).
    Differentiable w.r.t. every parameter; PEFT-wrapped models included (LoRA on the lm_head too).
    """
    hidden, shifted = _head_inputs(model, input_ids, labels, attention_mask, position_ids)
    return _fused(model, hidden, shifted, functools.partial(sequence_logps, average=average, backend=backend))


def model_dpo_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                   ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                   *, attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                   router_aux_loss_coef: float = 0.0, **loss_options):
    """``linear_dpo_loss`` of a Hugging Face causal LM: input_ids/labels [2B, L] (the B chosen rows, then the B
    rejected rows; labels as in ``model_sequence_logps``) -> (loss, metrics) (and the policy's log-probs [2B]
    with ``return_logps=True``). Loss options as in ``fastdpo.loss.linear_dpo_loss``.

    ``router_aux_loss_coef`` (an MoE model; resolve it with ``fastdpo.heads.router_aux_loss_coef`` as TRL does):
    non-zero adds that times the router's load-balancing loss (``router_aux_loss``, over the tokens
    ``attention_mask`` keeps) to the loss, as TRL's DPOTrainer does, and reports it as ``metrics["aux_loss"]``."""
    def loss_of(h, w, y, **options):
        return linear_dpo_loss(h, w, y, ref_chosen_logps, ref_rejected_logps, **options, **loss_options)
    if not router_aux_loss_coef:
        hidden, shifted = _head_inputs(model, input_ids, labels, attention_mask, position_ids)
        return _fused(model, hidden, shifted, loss_of)
    hidden, shifted, router_logits = _head_inputs(model, input_ids, labels, attention_mask, position_ids,
                                                  router_logits=True)
    aux = router_aux_loss(model, router_logits, attention_mask)
    loss, metrics, *logps = _fused(model, hidden, shifted, loss_of)
    return (loss + router_aux_loss_coef * aux, {**metrics, "aux_loss": aux.detach()}, *logps)


# ------------------------------------------------------------------------------------ unknown classes: the probe

PROBE_POSITIONS, PROBE_TARGETS = 8, 16


def check_output_head(model) -> Optional[str]:
    """Make sure the fused head reproduces ``model``'s own forward; call once after loading (it is cheap for a
    known class).

    A class in ``fastdpo.heads.HEADS``: the table's rule (None). Another class (remote code, a family the table
    does not list) whose output layer is a plain linear map: one small forward of the model itself, in its own
    dtype (eval mode, no autocast), on ``PROBE_POSITIONS`` tokens; its log_softmax at ``PROBE_TARGETS`` vocabulary
    ids spread over the vocabulary, at every position, must equal the fused path's (backbone at
    ``base_model_prefix``, then lm_head) within 1e-5 of the largest log-prob plus two units of the logits' dtype
    (rounding of the model's own logits). Equal: this model is accepted (``head_rule`` then knows it) and the
    one-line notice is returned; different: ValueError."""
    base = _base(model)
    if known_rule(base) is not None:
        return None
    rule = probe_rule(base)
    module = base.get_output_embeddings()
    if module is None:
        raise ValueError(unknown_head(base, "it has no output embeddings to probe"))
    weight, bias, lora = _linear_parts(module, type(base).__name__)
    head = Head(weight, bias, 1.0, None, lora)
    V = weight.shape[0]
    embeddings = base.get_input_embeddings()
    ids = (torch.arange(PROBE_POSITIONS, device=weight.device) * 7919 + 1) % min(V, embeddings.weight.shape[0])
    targets = torch.linspace(0, V - 1, PROBE_TARGETS, device=weight.device).round().long()      # [K]
    labels = targets[:, None].expand(-1, PROBE_POSITIONS)                                       # [K, P]
    training = base.training
    base.eval()                                     # no dropout, in the model or in a LoRA head's term
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            out = base(input_ids=ids[None])
            logits = out.logits if hasattr(out, "logits") else out[0]                              # [1, P, V]
            hidden = _last_hidden(_backbone_outputs(model, ids[None], rule=rule))                 # [1, P, D]
            hidden = head.extend(hidden).expand(PROBE_TARGETS, -1, -1)                             # [K, P, D']
            got = sequence_logps(hidden, weight, labels, return_token_logps=True, **head.options())[1]
    finally:
        base.train(training)
    if tuple(logits.shape) != (1, PROBE_POSITIONS, V):
        raise ValueError(unknown_head(base, f"its forward's logits are shaped {tuple(logits.shape)}, not "
                                            f"[1, {PROBE_POSITIONS}, {V}] (tokens x its output layer's rows)"))
    want = torch.log_softmax(logits[0].double(), -1)[:, targets].T                                 # [K, P]
    err = (got.double() - want).abs().max().item()
    tol = 1e-5 * max(1.0, want.abs().max().item()) + 2 * torch.finfo(logits.dtype).eps * logits.abs().max().item()
    if not err <= tol:
        raise ValueError(unknown_head(base, f"its forward's log-probs differ from lm_head(backbone(...))'s by "
                                            f"{err:.3g} (> {tol:.3g}) on the probe"))
    accept_probed(base, rule)
    return (f"fastdpo: {type(base).__name__} ({type(base).__module__}) is not in fastdpo.heads.HEADS; accepted: its "
            f"own log-probs equal lm_head({rule.backbone}(...))'s on a {PROBE_POSITIONS}-token probe")


# ------------------------------------------------------------------------------------------------ long-context layouts

def _mask_dtype(base, device_type: str) -> torch.dtype:
    """The dtype the attention computes in: the weights', or autocast's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(base.parameters()).dtype


def _checkpointing(base) -> bool:
    """Gradient checkpointing on (transformers 5.x: is_activation_checkpointing; before: is_gradient_checkpointing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name) or hasattr(base, name):
            return bool(getattr(base, name))
    return False


ATTENTION = ("auto", "span", "dense")


def span_unavailable(model, checkpointing: Optional[bool] = None) -> Optional[str]:
    """Why ``attention="span"`` cannot run for ``model`` (None: it can). ``checkpointing``: whether gradient
    checkpointing will be on (default: whether it is)."""
    base = _base(model)
    impl = getattr(base.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"it runs sdpa span by span; {type(base).__name__} runs {impl!r}"
    if _checkpointing(base) if checkpointing is None else checkpointing:
        return "gradient checkpointing's recompute would take the dense mask"
    if not _attention.available():
        return "it needs transformers' AttentionInterface (transformers >= 4.48)"
    return None


def attends_by_span(model, device_type: str) -> bool:
    """``attention="auto"``: whether a PackedBatch's attention runs span by span (``fastdpo._attention``: only the
    blocks its mask opens, and no [L, L] mask, so rows may hold a whole micro-batch): where ``span_unavailable``
    finds nothing missing, on the CPU, where it was measured (not yet on a GPU)."""
    return device_type == "cpu" and span_unavailable(model) is None


def _span_route(base, device_type: str, attention: str) -> bool:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "auto":
        return attends_by_span(base, device_type)
    why = span_unavailable(base) if attention == "span" else None
    if why:
        raise ValueError(f"attention='span': {why}")
    return attention == "span"


def _check_span_calls(base, masks) -> None:
    """Every attention layer ran through span_attention (a layer that bypassed transformers' attention
    interface would have met the placeholder)."""
    pinned = [m.fastdpo_spans for m in (masks.values() if isinstance(masks, dict) else [masks])
              if hasattr(m, "fastdpo_spans")]
    if pinned and sum(s.calls for s in pinned) != base.config.num_hidden_layers:
        raise RuntimeError(f"{type(base).__name__}: {sum(s.calls for s in pinned)} of its "
                           f"{base.config.num_hidden_layers} attention layers ran through fastdpo's span attention")


def _cached_prompt_keys(cache, config) -> dict:
    """{layer type (None without config.layer_types): prompt keys its layers' cache holds}."""
    types = getattr(config, "layer_types", None)
    out = {}
    for i, layer in enumerate(cache.layers):
        t = None if types is None else types[i]
        n = layer.keys.shape[-2]
        if out.setdefault(t, n) != n:
            raise ValueError(f"layers of type {t} cache {out[t]} and {n} prompt keys: no single mask fits them")
    return out


def _pair_inputs(model, batch, attention: str):
    """The hidden state predicting each target of a PackedBatch or CacheBatch, gathered into [2B, T, D] (chosen
    sequences first), and its labels: one backbone pass (two with the cache)."""
    base = _base(model)
    check_layout_support(base)
    rule = head_rule(base)
    backbone = rule.backbone_of(base)
    if isinstance(batch, PackedBatch):
        dtype = _mask_dtype(base, batch.input_ids.device.type)
        by_span = _span_route(base, batch.input_ids.device.type, attention)
        masks = attention_masks(batch, base.config, dtype, with_spans=by_span)
        with spans_attention(base) if by_span else contextlib.nullcontext():
            out = backbone(input_ids=batch.input_ids, attention_mask=masks, position_ids=batch.position_ids,
                           use_cache=False)
        _check_span_calls(base, masks)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    elif isinstance(batch, CacheBatch):
        if _checkpointing(base) and base.training:
            raise ValueError("the prompt-cache layout needs the key/value cache, which gradient checkpointing turns "
                             "off; use pack_pairs")
        first = backbone(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                         position_ids=batch.prompt_positions, use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        cache.batch_repeat_interleave(2)            # rows chosen_0, rejected_0, chosen_1, ... as the replies
        if (getattr(base.config, "_attn_implementation", None) or "eager") in ("eager", "sdpa"):
            # one additive [2B, 1, R, P + R] mask for all layers: from the 2D mask transformers builds a bool one
            # that sdpa converts, and keeps for its backward, in every layer (CPU, one pair of 24k + 2 x 4k
            # tokens: 7.3 GB peak, above the plain layout's 5.5 GB)
            mask = attention_masks(batch, base.config, _mask_dtype(base, batch.reply_ids.device.type),
                                   _cached_prompt_keys(cache, base.config))
        else:
            mask = torch.cat([batch.prompt_mask.repeat_interleave(2, 0), batch.reply_mask], 1)
        name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        second = backbone(input_ids=batch.reply_ids, attention_mask=mask, position_ids=batch.reply_positions,
                          use_cache=True, **{name: cache})
        D = first.last_hidden_state.shape[-1]
        flat = torch.cat([first.last_hidden_state.reshape(-1, D), second.last_hidden_state.reshape(-1, D)])
    else:
        raise TypeError(f"batch must be a fastdpo.layout PackedBatch or CacheBatch, got {type(batch).__name__}")
    return flat[batch.index], batch.labels


def model_pair_logps(model, batch, *, average: bool = False, backend: str = "auto",
                     attention: str = "auto") -> torch.Tensor:
    """[2B] log-probs (the B chosen replies, then the B rejected ones) of pairs laid out by
    ``fastdpo.layout.pack_pairs`` or ``prompt_cache_batch``: equal to ``model_sequence_logps`` on the plain padded
    layout, with each prompt encoded once.

    ``attention`` (a PackedBatch): "dense" hands the backbone the layout's [R, 1, L, L] mask; "span" runs sdpa over
    only the blocks it opens (``fastdpo._attention``; sdpa models, no gradient checkpointing); "auto": span where
    ``attends_by_span`` says so (the CPU), else dense. The same values either way, rounding apart."""
    hidden, labels = _pair_inputs(model, batch, attention)
    return _fused(model, hidden, labels, functools.partial(sequence_logps, average=average, backend=backend))


def model_pair_dpo_loss(model, batch, ref_chosen_logps=None, ref_rejected_logps=None, *, attention: str = "auto",
                        **loss_options):
    """``model_dpo_loss`` for pairs laid out by ``fastdpo.layout`` (``attention``: see ``model_pair_logps``)."""
    hidden, labels = _pair_inputs(model, batch, attention)
    return _fused(model, hidden, labels, lambda h, w, y, **o: linear_dpo_loss(h, w, y, ref_chosen_logps,
                                                                               ref_rejected_logps, **o,
                                                                               **loss_options))
