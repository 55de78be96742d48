"""Long-context layouts (fastdpo.layout): the shared prompt, packing and the prompt cache give the plain padded
layout's log-probs and every parameter's gradient (fp32), sliding windows and softcaps included."""
import contextlib
import itertools
from types import SimpleNamespace

import pytest
import torch

import fastdpo
from fastdpo import _attention, heads, models
from fastdpo.layout import CHOSEN, PROMPT, REJECTED, allowed, attention_masks, pack_pairs, prompt_cache_batch, spans
from fastdpo.train.prefs import Example, collate

from conftest import GRAD_FLOOR, MODEL_RTOL
from families import V, tiny

LAYOUT_FAMILIES = ["llama", "qwen2-tied", "gemma2-softcap", "mistral-sliding-window", "qwen3", "gemma-scaled-embeddings",
                   "gemma3-softcap", "phi3", "mixtral-moe", "granite-scaling"]
LAYOUTS = {
    "shared+packed": lambda pairs: pack_pairs(pairs, 0, max_tokens=40),
    "shared": lambda pairs: pack_pairs(pairs, 0, packing=False),
    "packed": lambda pairs: pack_pairs(pairs, 0, share_prompt=False, max_tokens=40),
    "prompt-cache": lambda pairs: prompt_cache_batch(pairs, 0),
}


def make_pairs(seed=0, sizes=((7, 5, 3), (3, 6, 9), (12, 2, 4), (1, 3, 3))):
    """Replies long enough that the tiny models' sliding window (4) cuts into the prompt."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, V, (n,), generator=g).tolist() for n in size) for size in sizes]


def logps_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    logps = fn()
    (torch.linspace(-1.0, 1.5, logps.shape[0]) * logps).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, what):
    (la, ga), (lb, gb) = a, b
    assert (la - lb).abs().max() <= MODEL_RTOL * lb.abs().max(), f"{what}: log-probs {la} vs {lb}"
    assert ga.keys() == gb.keys(), what
    floor = GRAD_FLOOR * max(g.abs().max().item() for g in gb.values())
    for n in gb:
        err, scale = (ga[n] - gb[n]).abs().max().item(), max(gb[n].abs().max().item(), floor)
        assert err <= MODEL_RTOL * scale, f"{what} d/d {n}: {err:.3e} > {MODEL_RTOL} * {scale:.3e}"


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_layouts_equal_the_plain_padded_layout(family):
    model = tiny(family)
    pairs = make_pairs()
    ids, mask, labels = collate([Example(*p) for p in pairs], 0)
    plain = logps_and_grads(model, lambda: fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask))
    for name, build in LAYOUTS.items():
        batch = build(pairs)
        assert_same(logps_and_grads(model, lambda: fastdpo.model_pair_logps(model, batch)), plain, f"{family} {name}")


def test_eager_attention_takes_an_additive_mask():
    model = tiny("mistral-sliding-window")
    model.config._attn_implementation = "eager"
    pairs = make_pairs()
    ids, mask, labels = collate([Example(*p) for p in pairs], 0)
    plain = logps_and_grads(model, lambda: fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask))
    batch = pack_pairs(pairs, 0, max_tokens=40)
    assert_same(logps_and_grads(model, lambda: fastdpo.model_pair_logps(model, batch)), plain, "eager")


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap"])
def test_prompt_cache_reply_pass_gets_one_additive_mask(family, monkeypatch):
    """The reply pass gets one float [2B, 1, R, kv] mask per layer type, built once: from a 2D mask sdpa would
    convert a bool one, and keep the copy for its backward, in every layer (measured: 7.3 GB instead of 5.5 GB
    at 24k + 2 x 4k tokens). A sliding-window cache holds only the last window - 1 prompt keys."""
    model = tiny(family)
    pairs = make_pairs()
    batch = prompt_cache_batch(pairs, 0)
    backbone = heads.head_rule(model).backbone_of(model)
    masks, forward = [], backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda *a, **k: masks.append(k["attention_mask"]) or forward(*a, **k))
    fastdpo.model_pair_logps(model, batch)
    reply = masks[1] if isinstance(masks[1], dict) else {"full_attention": masks[1]}
    P, (B2, R) = batch.prompt_ids.shape[1], batch.reply_ids.shape
    window = getattr(model.config, "sliding_window", None)
    for layer_type, mask in reply.items():
        kv = R + (min(P, window - 1) if layer_type == "sliding_attention" else P)
        assert mask.dtype == torch.float32 and mask.shape == (B2, 1, R, kv), layer_type
    if isinstance(masks[1], dict):
        assert set(reply) == {"full_attention", "sliding_attention"}


def test_flex_attention_block_mask_forward(device):
    """The block mask, checked in the forward (FlexAttention has no backward on the CPU). On the CPU torch 2.13's
    FlexAttention gave NaN for some tokens in some runs of this very test: there the layout refuses it."""
    model = tiny("llama").to(device)
    pairs = make_pairs()
    ids, mask, labels = (t.to(device) for t in collate([Example(*p) for p in pairs], 0))
    with torch.no_grad():
        plain = fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask)
        model.config._attn_implementation = "flex_attention"
        batch = pack_pairs(pairs, 0, max_tokens=40).to(device)
        if device == "cpu":
            with pytest.raises(ValueError, match="FlexAttention on the CPU returns NaN for some tokens"):
                fastdpo.model_pair_logps(model, batch)
            return
        shared = fastdpo.model_pair_logps(model, batch)
    assert (shared - plain).abs().max() <= MODEL_RTOL * plain.abs().max()


def test_dpo_loss_in_the_layout_equals_the_plain_one():
    model = tiny("gemma2-softcap")
    pairs = make_pairs()
    ids, mask, labels = collate([Example(*p) for p in pairs], 0)
    ref = torch.zeros(len(pairs))
    a, ma = fastdpo.model_dpo_loss(model, ids, labels, ref, ref - 1, attention_mask=mask, beta=0.3)
    b, mb = fastdpo.model_pair_dpo_loss(model, pack_pairs(pairs, 0), ref, ref - 1, beta=0.3)
    assert abs(a.item() - b.item()) <= MODEL_RTOL * abs(a.item())
    assert mb["rewards/accuracies"] == ma["rewards/accuracies"]


def test_rejected_tokens_never_see_chosen_tokens_and_positions_continue_from_the_prompt():
    batch = pack_pairs([([5, 6, 7], [8, 9], [10, 11, 12])], 0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch.part.tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3]
    ok = allowed(batch)[0, 0]
    assert not ok[5:, 3:5].any() and ok[5:, :3].all() and ok[7, 5:8].all()
    # chosen 8, 9 predicted from positions 2, 3; rejected 10 from the prompt's last (2), 11, 12 from 5, 6
    assert batch.index.tolist() == [[2, 3, 0], [2, 5, 6]]
    assert batch.labels.tolist() == [[8, 9, -100], [10, 11, 12]]
    assert allowed(batch, window=2)[0, 0, 7].tolist() == [False] * 5 + [False, True, True]


def test_packing_fills_rows_and_never_lets_sequences_see_each_other():
    pairs = make_pairs(sizes=((2, 2, 2), (2, 1, 1), (3, 2, 2), (1, 1, 1)))
    batch = pack_pairs(pairs, 0, max_tokens=10)
    assert batch.input_ids.shape == (2, 10)                   # 6 + 4 in one row, 7 + 3 in the other
    ok = allowed(batch)
    seq = batch.sequence
    cross = (seq[:, :, None] != seq[:, None, :]) & (seq[:, None, :] >= 0)
    assert not (ok[:, 0] & cross).any()
    with pytest.raises(ValueError, match="max_tokens=5 is shorter than a sequence of the batch"):
        pack_pairs(pairs, 0, max_tokens=5)
    with pytest.raises(ValueError, match=r"pairs\[1\] has an empty chosen or rejected reply"):
        pack_pairs([pairs[0], ([1], [], [2])], 0)


def test_models_the_layouts_are_not_verified_for_raise():
    model = tiny("gpt2-tied")
    with pytest.raises(ValueError, match="not verified for GPT2LMHeadModel"):
        fastdpo.model_pair_logps(model, pack_pairs(make_pairs(), 0))
    assert "LlamaForCausalLM" in heads.LAYOUT_CLASSES


def test_models_with_recurrent_layers_raise():
    model = tiny("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"attention layers only; this model has \['linear_attention'\]"):
        fastdpo.model_pair_logps(model, pack_pairs(make_pairs(), 0))


# ------------------------------------------------ span attention (fastdpo._attention)

SPAN_FAMILIES = [f for f in LAYOUT_FAMILIES if f != "gemma2-softcap"]      # gemma2 runs eager (attention softcap)
SPAN_SIZES = ((7, 5, 3), (0, 4, 2), (3, 6, 9), (12, 2, 4), (1, 3, 3))      # an empty prompt too


@pytest.mark.parametrize("family", SPAN_FAMILIES)
def test_span_attention_equals_the_dense_mask(family, monkeypatch):
    """Every layer through span_attention's own blocks (the dense fallback fails the test): the dense mask's
    log-probs and gradients, with one row for the whole batch, rows of 40 (padding at their ends) and unshared
    sequences; GQA (2 key/value heads of 4) and sliding windows of 4 that cut into the prompt included."""
    model = tiny(family)
    pairs = make_pairs(sizes=SPAN_SIZES)
    total = sum(map(len, itertools.chain(*pairs)))
    batches = {"one row": pack_pairs(pairs, 0, max_tokens=total), "rows of 40": pack_pairs(pairs, 0, max_tokens=40),
               "unshared": pack_pairs(pairs, 0, share_prompt=False, max_tokens=2 * total)}
    for name, batch in batches.items():
        dense = logps_and_grads(model, lambda: fastdpo.model_pair_logps(model, batch, attention="dense"))
        with monkeypatch.context() as m:
            m.setattr(_attention, "_dense", lambda *a: pytest.fail("span_attention fell back to the dense mask"))
            span = logps_and_grads(model, lambda: fastdpo.model_pair_logps(model, batch, attention="span"))
        assert_same(span, dense, f"{family} {name}")


def test_span_attention_is_the_cpu_default_and_leaves_the_config_as_it_was(monkeypatch):
    model = tiny("llama")
    calls = []
    real = _attention.span_attention
    monkeypatch.setattr(_attention, "span_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fastdpo.model_pair_logps(model, pack_pairs(make_pairs(), 0))
    assert len(calls) == model.config.num_hidden_layers and model.config._attn_implementation == "sdpa"
    calls.clear()
    fastdpo.model_pair_logps(model, pack_pairs(make_pairs(), 0), attention="dense")
    assert not calls


def test_span_attention_kernel_against_sdpa_and_its_dense_fallback():
    """span_attention on its own: [R, H, L, d] queries against sdpa with the layout's dense mask, window and GQA;
    a keyword it does not know sends it to sdpa with the dense mask, built once."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    batch = pack_pairs(make_pairs(sizes=SPAN_SIZES), 0, max_tokens=30)
    R, L = batch.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(R, 4, L, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(R, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)
    valid = (batch.sequence >= 0)[:, :, None, None]                       # padding outputs are never read
    for window in (None, 3):
        config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=window)
        dense = attention_masks(batch, config, torch.float64)
        want, _ = sdpa_attention_forward(module, q, k, v, dense, scaling=0.3)
        placeholder = attention_masks(batch, config, torch.float64, with_spans=True)
        assert placeholder.untyped_storage().nbytes() == 8                # no [L, L] mask
        got, _ = _attention.span_attention(module, q, k, v, placeholder, scaling=0.3)
        torch.testing.assert_close(got * valid, want * valid, rtol=1e-12, atol=1e-12)
        fallback, _ = _attention.span_attention(module, q, k, v, placeholder, scaling=0.3, unknown=1.0)
        torch.testing.assert_close(fallback, want, rtol=1e-12, atol=1e-12)
        assert placeholder.fastdpo_spans.calls == 2 and "dense" in placeholder.fastdpo_spans.masks
    assert spans(batch)[0][0] == (0, 12, 7, 3)                             # (start, causal, shared, rejected)


def test_span_placeholder_never_passes_silently(monkeypatch):
    """An attention that is not span_attention gets NaN scores, and the call raises; so does span_attention given
    the placeholder without its spans (a copy or a slice of it)."""
    model = tiny("llama")
    batch = pack_pairs(make_pairs(), 0)
    monkeypatch.setattr(models, "spans_attention", lambda base: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="0 of its 2 attention layers ran through fastdpo's span attention"):
        fastdpo.model_pair_logps(model, batch, attention="span")
    config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=None)
    placeholder = attention_masks(batch, config, torch.float32, with_spans=True)
    q = torch.randn(*batch.input_ids.shape[:1], 4, batch.input_ids.shape[1], 8)
    with pytest.raises(ValueError, match="placeholder mask reached the attention without its spans"):
        _attention.span_attention(SimpleNamespace(is_causal=True), q, q, q, placeholder[:, :, :5])


def test_attention_option_is_checked():
    model = tiny("llama")
    batch = pack_pairs(make_pairs(), 0)
    with pytest.raises(ValueError, match="attention must be one of"):
        fastdpo.model_pair_logps(model, batch, attention="sparse")
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attention='span': it runs sdpa span by span; LlamaForCausalLM runs 'eager'"):
        fastdpo.model_pair_logps(model, batch, attention="span")
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="attention='span': gradient checkpointing's recompute"):
        fastdpo.model_pair_logps(model, batch, attention="span")
    assert not models.attends_by_span(model, "cpu")
