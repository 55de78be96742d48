"""fastdpo.integrations.trl.FastDPOTrainer against TRL's own DPOTrainer, trained side by side.

Both trainers get the same tiny random Llama, reference, data, seed and DPOConfig and run 2 optimizer steps
(fp32, CPU); every step's logged loss, grad_norm and TRL metric must agree within 1e-4 relative. Every TRL loss
type runs with a separate reference model; the variants (precomputed reference with evaluation, a PEFT LoRA
adapter with gradient checkpointing, LD-DPO, WPO, TR-DPO's reference sync) run with sigmoid (or as named).
Options FastDPOTrainer cannot honour must raise at construction. The setup (tokenizer, data, model) is
tests/test_trl_parity.py's.
"""
import dataclasses
import sys

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from test_trl_parity import BETA, CASES, make_dataset, make_model, make_tokenizer  # noqa: E402

from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402

RTOL = 1e-4          # FastDPOTrainer vs DPOTrainer, per step, fp32; never loosened per case
STEPS, PAIRS_PER_STEP = 2, 2
COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "num_tokens")
# per-token statistics of the full-vocabulary distribution: TRL logs them, the fused op does not form them
NOT_LOGGED = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}


@dataclasses.dataclass(frozen=True)
class Variant:
    id: str
    options: dict                 # DPOConfig options
    ref_model: bool = True        # a separate reference model (else: the policy itself, or the PEFT base)
    peft: bool = False
    eval: bool = False


VARIANTS = [
    Variant("precompute_ref_log_probs+eval", dict(precompute_ref_log_probs=True), eval=True),
    Variant("peft-lora+gradient_checkpointing", dict(gradient_checkpointing=True), ref_model=False, peft=True),
    Variant("ld_alpha-0.5", dict(ld_alpha=0.5)),
    Variant("use_weighting", dict(use_weighting=True)),
    Variant("use_weighting+ld_alpha-ipo", dict(loss_type="ipo", use_weighting=True, ld_alpha=0.3)),
    # (not with sft: TRL 1.16 fails there, weighting its expanded sft loss in place)
    Variant("use_weighting-mix-sigmoid+bco_pair",
            dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], use_weighting=True)),
    Variant("sync_ref_model", dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)),
]
# every loss type; of the f-divergences the one with a coefficient (each passes through the same way)
VARIANTS += [Variant(f"loss-{c.id}", c.options) for c in CASES if not c.id.startswith(("sigmoid-forward_kl",
                                                                                         "sigmoid-js_divergence"))]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is several times faster than a few contending ones (shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_config():
    from peft import LoraConfig
    # random B (init_lora_weights=False): the policy differs from its reference (the base) from the first step
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", init_lora_weights=False)


def config(output_dir, **options):
    return DPOConfig(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False, fp16=False,
                     **{"gradient_checkpointing": False, **options}, per_device_train_batch_size=PAIRS_PER_STEP,
                     per_device_eval_batch_size=PAIRS_PER_STEP, max_steps=STEPS, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", beta=BETA, seed=0, disable_tqdm=True)


def train(cls, variant: Variant, output_dir):
    """Log history entries of the training steps (and evaluations) of one trainer."""
    if variant.peft:
        pytest.importorskip("peft")
    evaluation = dict(eval_strategy="steps", eval_steps=1) if variant.eval else {}
    trainer = cls(model=make_model(seed=0), ref_model=make_model(seed=1) if variant.ref_model else None,
                  args=config(output_dir, **variant.options, **evaluation), train_dataset=make_dataset(),
                  eval_dataset=make_dataset(seed=3) if variant.eval else None, processing_class=make_tokenizer(),
                  peft_config=lora_config() if variant.peft else None)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]


def assert_rel(got, want, what, scale=None):
    """|got - want| <= RTOL * scale, scale = |want| (a difference, such as a margin: its operands' magnitude)."""
    scale = abs(want) if scale is None else scale
    assert abs(got - want) <= RTOL * scale, (
        f"{what}: FastDPOTrainer {got!r} vs DPOTrainer {want!r} (error {abs(got - want):.2e} relative to "
        f"{scale:.3g}: {abs(got - want) / max(scale, 1e-30):.2e} > {RTOL:g})")


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_steps_match_trl_dpo_trainer(variant, tmp_path):
    want = train(DPOTrainer, variant, tmp_path / "trl")
    got = train(FastDPOTrainer, variant, tmp_path / "fastdpo")
    assert len(got) == len(want) == STEPS * (2 if variant.eval else 1)
    for step, (g, w) in enumerate(zip(got, want)):
        prefix = "eval_" if "eval_loss" in w else ""
        assert set(w) - set(g) == {prefix + k for k in NOT_LOGGED} and set(g) <= set(w), f"step {step} keys"
        for key in COMPARED:
            if prefix and key == "grad_norm":
                continue
            name, what = prefix + key, f"{variant.id} entry {step} {prefix + key}"
            if key in ("rewards/accuracies", "num_tokens"):
                assert g[name] == w[name], f"{what}: FastDPOTrainer {g[name]} vs DPOTrainer {w[name]}"
            elif key == "rewards/margins":      # chosen minus rejected reward: relative to those
                assert_rel(g[name], w[name], what, max(abs(w[name]), abs(w[prefix + "rewards/chosen"]),
                                                       abs(w[prefix + "rewards/rejected"])))
            else:
                assert_rel(g[name], w[name], what)


def test_setup_trains_away_from_the_reference(tmp_path):
    """The per-step parity means something only if the steps move the policy: margins change sign or size."""
    history = train(DPOTrainer, next(v for v in VARIANTS if v.id == "loss-sigmoid"), tmp_path)
    margins = [h["rewards/margins"] for h in history]
    assert abs(margins[0]) > 0.1 and abs(margins[1] - margins[0]) > 0.1, margins


# ------------------------------------------------------------------------------------------- refused at construction


def tiny_moe():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                            num_experts_per_tok=1, pad_token_id=0, eos_token_id=1))


def unfusable_head():
    model = make_model(seed=0)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    return model


def prompt_tuning():
    from peft import PromptTuningConfig
    return dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


REFUSED = [
    ("use_liger_kernel", dict(use_liger_kernel=True), {}, "use_liger_kernel=True is not supported"),
    ("padding_free", dict(padding_free=True), {}, "padding_free=True is not supported"),
    ("torch_compile", dict(torch_compile=True), {}, "torch_compile=True is not supported"),
    ("label_smoothing-unused", dict(label_smoothing=0.1), {}, "label_smoothing=0.1 has no effect"),
    ("ld_alpha+sft", dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5), {}, "ld_alpha with loss_type 'sft'"),
    ("ld_alpha-range", dict(ld_alpha=1.5), {}, r"ld_alpha must be None or a number in \[0, 1\]"),
    ("use_weighting+aot", dict(loss_type="aot", use_weighting=True), {}, r"use_weighting: .* \['aot'\]"),
    ("unfusable-head", {}, dict(model=unfusable_head), "LlamaForCausalLM: the output layer is a Sequential"),
    ("moe-router_aux_loss", {}, dict(model=tiny_moe, ref_model=None), "router_aux_loss_coef=0.001"),
    ("prompt-learning-peft", {}, dict(ref_model=None, extra=prompt_tuning), "prompt-learning PEFT"),
]


@pytest.mark.parametrize("options, inputs, match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsupported_options_raise_at_construction(options, inputs, match, tmp_path, monkeypatch):
    if "extra" in inputs:
        pytest.importorskip("peft")
    monkeypatch.setattr(DPOTrainer, "__init__", lambda *a, **k: pytest.fail("TRL's constructor ran"))
    model = inputs.get("model", lambda: make_model(seed=0))()
    ref_model = make_model(seed=1) if inputs.get("ref_model", True) else None
    with pytest.raises(ValueError, match=match):
        FastDPOTrainer(model=model, ref_model=ref_model, args=config(tmp_path, **options),
                       train_dataset=make_dataset(), processing_class=make_tokenizer(),
                       **inputs.get("extra", dict)())


def test_import_without_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)          # import trl -> ImportError
    monkeypatch.delitem(sys.modules, "fastdpo.integrations.trl")
    with pytest.raises(ImportError, match="pip install trl"):
        import fastdpo.integrations.trl  # noqa: F401


# ------------------------------------------------------------------------------------------------------ the example


def test_example_swaps_one_line_and_trains(monkeypatch):
    import pathlib
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import trl_dpo
    assert trl_dpo.main(steps=8) < 0.6931 * 0.5            # from ln 2 at step 1 (reference = initial policy)
