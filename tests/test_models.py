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


TABLE_FROM = "5.25"      # the transformers release whose causal-LM classes heads.HEADS was written from


def test_every_table_entry_is_a_transformers_class():
    """A typo in the head table is caught here (on CI's newest transformers); an older release lacks the classes
    added after it (the GPU machine runs 5.17), which the table may name without harm: looked up by class name."""
    from packaging.version import Version
    missing = [name for name in heads.HEADS if not hasattr(transformers, name)]
    if missing and Version(transformers.__version__) < Version(TABLE_FROM):
        pytest.skip(f"transformers {transformers.__version__} predates {len(missing)} of the table's classes")
    assert not missing, missing


# ------------------------------------------------------------------------------------------------ MoE router loss

def test_router_aux_loss_is_the_models_own_load_balancing_loss():
    """model_dpo_loss(router_aux_loss_coef=c) adds c times the load-balancing loss the model's own forward
    returns (output_router_logits=True, the same attention mask) and reports it; c=0 adds nothing."""
    model = tiny("mixtral-moe")
    ids, labels, mask = batch(B=4)
    ref = torch.zeros(2)
    plain, _ = model_dpo_loss(model, ids, labels, ref, ref, attention_mask=mask)
    loss, metrics = model_dpo_loss(model, ids, labels, ref, ref, attention_mask=mask, router_aux_loss_coef=0.5)
    own = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert (mask == 0).any() and own.item() > 0.5
    assert_close_rel(metrics["aux_loss"], own.detach(), "aux_loss")
    assert_close_rel(loss.detach() - plain.detach(), 0.5 * own.detach(), "loss - DPO loss")
    assert "aux_loss" not in model_dpo_loss(model, ids, labels, ref, ref, attention_mask=mask)[1]
    loss.backward()
    router = [p.grad for n, p in model.named_parameters() if "gate" in n and "experts" not in n]
    assert router and all(g is not None and g.abs().max() > 0 for g in router), "the router gets a gradient"


def test_router_aux_loss_coef_follows_trl():
    moe, dense = tiny("mixtral-moe"), tiny("llama")
    assert heads.router_aux_loss_coef(moe) == moe.config.router_aux_loss_coef == 0.001     # None: the config's
    assert heads.router_aux_loss_coef(moe, 0.25) == 0.25
    assert heads.router_aux_loss_coef(moe, 0.0) == 0.0
    assert heads.router_aux_loss_coef(dense) == heads.router_aux_loss_coef(dense, 0.0) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef is set to 0.1 but LlamaForCausalLM is not a "
                                         "Mixture-of-Experts model"):
        heads.router_aux_loss_coef(dense, 0.1)
    with pytest.raises(ValueError, match="GraniteMoeForCausalLM's config has no num_experts"):
        heads.router_aux_loss_coef(tiny("granitemoe-scaling"))


# ------------------------------------------------------------------------------------------------ the probe

class PlainSubclass(transformers.LlamaForCausalLM):
    """A class the head table does not know whose forward is its parent's (e.g. remote code)."""


class ScalingSubclass(transformers.LlamaForCausalLM):
    """A class the head table does not know whose forward changes the logits."""
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.factor
        return out


def test_probe_accepts_an_unknown_class_whose_forward_is_lm_head_of_the_backbone():
    model = PlainSubclass(transformers.LlamaConfig(**COMMON)).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match="does not know the output head of PlainSubclass"):
        fastdpo.model_sequence_logps(model, ids, labels)             # not before the probe
    notice = fastdpo.models.check_output_head(model)
    assert notice.startswith("fastdpo: PlainSubclass") and "\n" not in notice
    assert fastdpo.models.check_output_head(model) is None         # accepted once, for this model
    compare_with_plain(model, ids, labels, mask, "probed PlainSubclass")
    other = PlainSubclass(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="no probe accepted it"):
        fastdpo.model_sequence_logps(other, ids, labels)             # another model is probed on its own
    assert fastdpo.models.check_output_head(tiny("llama")) is None  # a known class: the table, no probe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("factor", [1.0, 1.05, 0.5])
def test_probe_refuses_a_forward_that_scales_the_logits(dtype, factor):
    """The probe runs in the model's dtype: a 5% logit scale is caught in fp32 and in bf16 (its logits'
    rounding allowed); the plain forward (factor 1) passes in both."""
    model = ScalingSubclass(transformers.LlamaConfig(**COMMON)).to(dtype)
    model.factor = factor
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    if factor == 1.0:
        assert fastdpo.models.check_output_head(model)
        return
    with pytest.raises(ValueError, match="ScalingSubclass .* log-probs differ from lm_head\\(backbone\\(...\\)\\)'s"):
        fastdpo.models.check_output_head(model)
    with pytest.raises(ValueError, match="no probe accepted it"):
        fastdpo.model_sequence_logps(model, *batch()[:2])


def test_probe_refuses_an_unknown_class_whose_head_is_not_linear():
    model = PlainSubclass(transformers.LlamaConfig(**COMMON))
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="PlainSubclass: the output layer is a Sequential"):
        fastdpo.models.check_output_head(model)


def test_probe_of_an_unknown_class_with_lora_on_its_head():
    """PEFT-wrapped: the probe runs the adapters (the head's LoRA term in the fused product), dropout off, and
    leaves the training mode as it found it."""
    model = lora(PlainSubclass(transformers.LlamaConfig(**COMMON)), ["q_proj", "lm_head"], lora_dropout=0.5)
    model.train()
    assert fastdpo.models.check_output_head(model)
    assert model.training
    compare_with_plain(model.eval(), *batch(), "probed PlainSubclass + LoRA on lm_head")


@pytest.mark.parametrize("family", ["gemma2-softcap", "phi-bias", "gpt2-tied", "granite-scaling"])
def test_the_hidden_state_snippet_gives_the_model_level_loss(family):
    """docs/drop-in.md's loop-level form (output_head + backbone_hidden + linear_dpo_loss) is the model-level op:
    softcap, head bias, logit scaling and a backbone not at model.model included."""
    import fastdpo
    from families import batch, tiny
    from fastdpo.loss import linear_dpo_loss
    model = tiny(family)
    ids, labels, mask = batch(B=4)
    ref_c, ref_r = torch.tensor([-30.0, -25.0]), torch.tensor([-31.0, -26.0])
    want, _ = fastdpo.model_dpo_loss(model, ids, labels, ref_c, ref_r, attention_mask=mask, beta=0.1)
    head = fastdpo.output_head(model)
    hidden = fastdpo.models.backbone_hidden(model, ids, mask)[:, :-1]
    got, _ = linear_dpo_loss(head.extend(hidden), head.weight, labels[:, 1:], ref_c, ref_r, **head.options(),
                             beta=0.1, loss_type="sigmoid")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    if family != "gpt2-tied":           # a plain head (its backbone is model.transformer, not model.model)
        naive, _ = linear_dpo_loss(hidden, model.get_output_embeddings().weight, labels[:, 1:], ref_c, ref_r,
                                   beta=0.1)
        assert abs(naive.item() - want.item()) > 1e-3      # the weight alone is another model
