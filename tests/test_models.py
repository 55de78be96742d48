"""fastdpo.model_sequence_logps on real Hugging Face families: the plain path's values and every parameter's
gradient (fp32), with each family's output head (bias, scaling, softcap, tied weights, PEFT); heads it cannot
reproduce raise."""
import pytest
import torch
import transformers

import fastdpo
from fastdpo import heads, reference
from fastdpo.models import model_dpo_loss

from conftest import GRAD_FLOOR, MODEL_RTOL, assert_no_worse_than_reference
from families import COMMON, D, FAMILIES, V, batch, tiny

def assert_close_rel(actual, expected, what, floor=0.0):
    """max |actual - expected| <= MODEL_RTOL * max(max |expected|, floor)."""
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), floor) or 1.0
    assert err <= MODEL_RTOL * scale, f"{what}: max error {err:.3e} > {MODEL_RTOL} * {scale:.3e}"


def compare_with_plain(model, ids, labels, mask, what):
    """Values and the gradient of every trainable parameter: fused head vs the plain path."""
    w = torch.linspace(-1.0, 1.5, ids.shape[0])
    out = {}
    for name, fn in (("fused", fastdpo.model_sequence_logps), ("plain", reference.model_sequence_logps)):
        model.zero_grad(set_to_none=True)
        logps = fn(model, ids, labels, attention_mask=mask)
        (w * logps).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (logps.detach(), grads)
    (a, ga), (b, gb) = out["fused"], out["plain"]
    assert_close_rel(a, b, f"{what} log-probs")
    assert ga.keys() == gb.keys() and ga, f"{what}: different parameters got gradients"
    # A parameter whose true gradient is 0 (a key bias, under the softmax) gets rounding residue in both paths:
    # compare it on the scale of the model's gradients (GRAD_FLOOR of the largest), not on its own.
    floor = GRAD_FLOOR * max(g.abs().max().item() for g in gb.values())
    for n in gb:
        assert_close_rel(ga[n], gb[n], f"{what} d/d {n}", floor)
    return a


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_the_plain_path(family):
    model = tiny(family)
    compare_with_plain(model, *batch(), family)


@pytest.mark.parametrize("family, moved", [("phi-bias", "bias"), ("granite-scaling", "scale"),
                                           ("gemma2-softcap", "softcap"), ("cohere-logit-scale", "scale")])
def test_the_head_option_is_used(family, moved):
    """The head's bias / scale / softcap change the answer: dropping it would be caught by the test above."""
    model = tiny(family)
    ids, labels, mask = batch()
    head = fastdpo.output_head(model)
    hidden = fastdpo.models.backbone_hidden(model, ids, mask)[:, :-1]
    options = head.options()
    dropped = dict(options, bias=None) if moved == "bias" else \
        dict(options, logit_scale=1.0) if moved == "scale" else dict(options, softcap=None)
    with torch.no_grad():
        right = fastdpo.sequence_logps(hidden, head.weight, labels[:, 1:], **options)
        wrong = fastdpo.sequence_logps(hidden, head.weight, labels[:, 1:], **dropped)
    assert (right - wrong).abs().max() > 1.0


def test_average_position_ids_and_dpo_loss():
    model = tiny("llama")
    ids, labels, mask = batch(B=4)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    a = fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask, position_ids=pos, average=True)
    b = reference.model_sequence_logps(model, ids, labels, attention_mask=mask, position_ids=pos, average=True)
    assert_close_rel(a.detach(), b.detach(), "average")
    ref = torch.zeros(2)
    loss, metrics, logps = model_dpo_loss(model, ids, labels, ref, ref, attention_mask=mask, return_logps=True)
    plain = reference.model_sequence_logps(model, ids, labels, attention_mask=mask)
    assert_close_rel(logps, plain.detach(), "model_dpo_loss log-probs")
    expected, _ = reference.dpo_loss(*plain.chunk(2), ref, ref, beta=0.1)
    assert_close_rel(loss.detach(), expected.detach(), "model_dpo_loss")


def test_autocast_takes_the_head_in_the_autocast_dtype():
    """Under autocast the fused head multiplies the lm_head in the autocast dtype, as F.linear would, with fp32
    accumulation: against float64 on the same bf16 operands it is no worse than the plain bf16 path."""
    model = tiny("llama")
    ids, labels, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask)
        plain = reference.model_sequence_logps(model, ids, labels, attention_mask=mask)
        hidden = fastdpo.models.backbone_hidden(model, ids, mask)[:, :-1]
    truth = reference.sequence_logps(hidden.to(torch.bfloat16).double(),
                                     model.lm_head.weight.to(torch.bfloat16).double(), labels[:, 1:])
    assert fused.dtype == torch.float32
    assert_no_worse_than_reference(fused, plain, truth, torch.bfloat16, "autocast bf16")


# ------------------------------------------------------------------------------------------------ PEFT

peft = pytest.importorskip("peft")


def lora(model, targets, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    return peft.get_peft_model(model, config)


def test_lora_on_the_lm_head_goes_into_the_fused_product():
    model = lora(tiny("qwen2-tied"), ["q_proj", "v_proj", "lm_head"])
    ids, labels, mask = batch()
    compare_with_plain(model, ids, labels, mask, "lora lm_head")
    grads = {n: p.grad for n, p in model.named_parameters() if "lm_head" in n and p.grad is not None}
    assert grads and all(g.abs().max() > 0 for g in grads.values())     # the adapter on the head trains
    with model.disable_adapter():
        base = fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask)
    plain_base = reference.model_sequence_logps(model.get_base_model(), ids, labels, attention_mask=mask)
    # get_base_model() still has the adapters on: compare with them off by hand
    with model.disable_adapter():
        plain_base = reference.model_sequence_logps(model, ids, labels, attention_mask=mask)
    assert_close_rel(base.detach(), plain_base.detach(), "adapters disabled")


def test_lora_with_bias_and_two_adapters_on_the_head():
    model = lora(tiny("phi-bias"), ["lm_head", "dense"], lora_bias=True)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"],
                                                init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    compare_with_plain(model, *batch(), "two adapters + lora_bias")


def test_modules_to_save_head():
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    compare_with_plain(model, *batch(), "modules_to_save lm_head")


def test_dora_on_the_head_raises():
    model = lora(tiny("llama"), ["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="LoRA variant .* not a plain low-rank term"):
        fastdpo.model_sequence_logps(model, *batch()[:2])


# ------------------------------------------------------------------------------------------------ what it refuses

def test_unknown_class_raises_instead_of_guessing():
    class MyLlama(transformers.LlamaForCausalLM):      # e.g. remote code that changes the forward
        pass
    model = MyLlama(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="does not know the output head of MyLlama"):
        fastdpo.model_sequence_logps(model, *batch()[:2])


def test_head_that_is_not_a_linear_map_raises():
    model = tiny("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(D, V))
    with pytest.raises(ValueError, match="the output layer is a Sequential, not a plain linear map"):
        fastdpo.model_sequence_logps(model, *batch()[:2])


def test_bad_arguments_name_themselves():
    model = tiny("llama")
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match="labels must be a tensor shaped like input_ids"):
        fastdpo.model_sequence_logps(model, ids, labels[:, 1:])
    with pytest.raises(ValueError, match="attention_mask must be a tensor shaped like input_ids"):
        fastdpo.model_sequence_logps(model, ids, labels, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="at least 2 positions"):
        fastdpo.model_sequence_logps(model, ids[:, :1], labels[:, :1])


def test_every_table_entry_is_a_transformers_class():
    for name in heads.HEADS:
        assert hasattr(transformers, name), name
