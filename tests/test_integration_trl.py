"""fastdpo.integrations.trl.FastDPOTrainer against TRL's own DPOTrainer, trained side by side.

Both trainers get the same tiny random Llama, reference, data, seed and DPOConfig and run 2 optimizer steps
(fp32, CPU); every step's logged loss, grad_norm and TRL metric must agree within 1e-4 relative. Every TRL loss
type runs with a separate reference model; the variants (precomputed reference with evaluation, a PEFT LoRA
adapter with gradient checkpointing, LD-DPO, WPO, TR-DPO's reference sync) run with sigmoid (or as named).
Options FastDPOTrainer cannot honour must raise at construction. The setup (tokenizer, data, model) is
tests/test_trl_parity.py's.
"""
import dataclasses
import re
import sys
import warnings

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from remote_code import remote_llama  # noqa: E402
from test_trl_parity import (BETA, CASES, MOE_FAMILIES, make_dataset, make_model, make_moe,  # noqa: E402
                             make_tokenizer)

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
    family: str = "llama"         # make_model, or a MoE family of make_moe

    def make(self, seed):
        return make_model(seed) if self.family == "llama" else make_moe(self.family, seed)


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
# MoE: with DPOConfig's default router_aux_loss_coef (None: the config's 0.001) TRL adds the router's load-balancing
# loss and logs aux_loss; a larger coefficient, evaluation, PEFT on an MoE model
MOE_VARIANTS = [Variant(f"moe-{f}", {}, family=f) for f in MOE_FAMILIES]
MOE_VARIANTS += [Variant("moe-mixtral-router_aux_loss_coef-0.5+eval", dict(router_aux_loss_coef=0.5), eval=True,
                         family="mixtral"),
                 Variant("moe-qwen3_moe-peft-lora", {}, ref_model=False, peft=True, family="qwen3_moe")]
VARIANTS += MOE_VARIANTS
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
    trainer = cls(model=variant.make(seed=0), ref_model=variant.make(seed=1) if variant.ref_model else None,
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
    moe = variant.family != "llama"
    assert all(("aux_loss" in h or "eval_aux_loss" in h) == moe for h in want), "TRL's aux_loss entries"
    assert_same_steps(got, want, variant.id, STEPS * (2 if variant.eval else 1), extra=("aux_loss",) if moe else ())


def assert_same_steps(got, want, what, entries, extra=()):
    """Log histories of FastDPOTrainer and DPOTrainer: the same entries, every compared key within RTOL."""
    assert len(got) == len(want) == entries
    for step, (g, w) in enumerate(zip(got, want)):
        prefix = "eval_" if "eval_loss" in w else ""
        assert set(w) - set(g) == {prefix + k for k in NOT_LOGGED}, f"step {step} keys"
        assert set(g) - set(w) == {prefix + "fastdpo/positions"}, f"step {step} keys"       # fastdpo's own
        for key in (*COMPARED, *extra):
            if prefix and key == "grad_norm":
                continue
            name, where = prefix + key, f"{what} entry {step} {prefix + key}"
            if key in ("rewards/accuracies", "num_tokens"):
                assert g[name] == w[name], f"{where}: FastDPOTrainer {g[name]} vs DPOTrainer {w[name]}"
            elif key == "rewards/margins":      # chosen minus rejected reward: relative to those
                assert_rel(g[name], w[name], where, max(abs(w[name]), abs(w[prefix + "rewards/chosen"]),
                                                        abs(w[prefix + "rewards/rejected"])))
            else:
                assert_rel(g[name], w[name], where)


def test_setup_trains_away_from_the_reference(tmp_path):
    """The per-step parity means something only if the steps move the policy: margins change sign or size."""
    history = train(DPOTrainer, next(v for v in VARIANTS if v.id == "loss-sigmoid"), tmp_path)
    margins = [h["rewards/margins"] for h in history]
    assert abs(margins[0]) > 0.1 and abs(margins[1] - margins[0]) > 0.1, margins


# --------------------------------------------------------------------------------- a model given by name (TRL's way)


@pytest.fixture
def hub_name(tmp_path, monkeypatch):
    """make_model(seed=0) and its tokenizer as a snapshot in a local Hugging Face hub cache, read offline."""
    import huggingface_hub.constants
    cache, revision = tmp_path / "hub", "0" * 40
    repo = cache / "models--fake-org--tiny-llama"
    make_model(seed=0).save_pretrained(repo / "snapshots" / revision)
    make_tokenizer().save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "fake-org/tiny-llama"


class StepCounter:
    """A TrainerCallback (duck-typed as transformers calls it) counting optimizer steps."""
    def __init__(self):
        from transformers import TrainerCallback
        self.callback = type("Counter", (TrainerCallback,), {"on_step_end": lambda cb, *a, **k: self.tick()})()
        self.steps = 0

    def tick(self):
        self.steps += 1


# (id, DPOConfig options, FastDPOTrainer's ref_model (None, or "name": by name), PEFT LoRA, evaluation)
BY_NAME = [
    ("processing_class=None+default-ref+eval", {}, None, False, True),
    ("ref_model-by-name+precompute_ref_log_probs+eval", dict(precompute_ref_log_probs=True), "name", False, True),
    ("peft_config", {}, None, True, False),
]


@pytest.mark.parametrize("options, ref, peft, evaluation", [c[1:] for c in BY_NAME], ids=[c[0] for c in BY_NAME])
def test_model_by_name_trains_evaluates_and_precomputes_as_dpo_trainer(hub_name, options, ref, peft, evaluation,
                                                                       tmp_path):
    """model="org/name" with DPOConfig(model_init_kwargs=...), processing_class=None (TRL loads the tokenizer),
    callbacks: FastDPOTrainer loads, checks and trains what DPOTrainer loads, step for step. TRL's ref_model takes
    no name (TRL 1.16 fails on one); FastDPOTrainer loads it as the policy: against TRL's default reference (the
    same weights)."""
    if peft:
        pytest.importorskip("peft")
    histories = {}
    for cls in (DPOTrainer, FastDPOTrainer):
        counter = StepCounter()
        evaluation_options = dict(eval_strategy="steps", eval_steps=1) if evaluation else {}
        trainer = cls(model=hub_name, ref_model=hub_name if ref and cls is FastDPOTrainer else None,
                      args=config(tmp_path / cls.__name__, model_init_kwargs={"dtype": "float32"}, **options,
                                  **evaluation_options),
                      train_dataset=make_dataset(), eval_dataset=make_dataset(seed=3) if evaluation else None,
                      processing_class=None, callbacks=[counter.callback],
                      peft_config=lora_config() if peft else None)
        trainer.train()
        assert counter.steps == STEPS
        histories[cls] = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    assert_same_steps(histories[FastDPOTrainer], histories[DPOTrainer], "by name",
                      STEPS * (2 if evaluation else 1))


def test_given_optimizer_and_scheduler_step_as_in_dpo_trainer(tmp_path):
    """optimizers=(optimizer, scheduler): FastDPOTrainer steps with them, step for step as DPOTrainer."""
    histories = {}
    for cls in (DPOTrainer, FastDPOTrainer):
        model = make_model(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        trainer = cls(model=model, ref_model=make_model(seed=1), args=config(tmp_path / cls.__name__),
                      train_dataset=make_dataset(), processing_class=make_tokenizer(),
                      optimizers=(optimizer, scheduler))
        trainer.train()
        assert trainer.lr_scheduler is scheduler
        histories[cls] = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in histories[FastDPOTrainer]] == [0.5, 0.25]
    assert_same_steps(histories[FastDPOTrainer], histories[DPOTrainer], "optimizers", STEPS)


# ------------------------------------------------------------------------------- remote code: a class the table lacks

REMOTE_INIT = {"dtype": "float32", "trust_remote_code": True}


def test_remote_code_llama_subclass_is_probed_and_trains_as_dpo_trainer(tmp_path):
    """trust_remote_code, a class the head table does not know whose head is lm_head(backbone): accepted by the
    probe with a one-line notice (policy and TRL's default reference, both loaded by name), then step for step
    as DPOTrainer."""
    path = remote_llama(tmp_path / "remote", make_model(seed=0), make_tokenizer())
    histories = {}
    for cls in (DPOTrainer, FastDPOTrainer):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = cls(model=path, args=config(tmp_path / cls.__name__, model_init_kwargs=REMOTE_INIT),
                          train_dataset=make_dataset(), processing_class=None)
        assert type(trainer.model).__name__ == "RemoteLlamaForCausalLM"
        assert type(trainer.model).__module__.startswith("transformers_modules.")
        notices = [str(w.message) for w in caught if "is not in fastdpo.heads.HEADS; accepted" in str(w.message)]
        assert len(notices) == (2 if cls is FastDPOTrainer else 0), notices
        trainer.train()
        histories[cls] = [h for h in trainer.state.log_history if "loss" in h]
    assert_same_steps(histories[FastDPOTrainer], histories[DPOTrainer], "remote code", STEPS)


@pytest.mark.parametrize("by_name", [True, False], ids=["by-name+precompute", "instance"])
def test_remote_code_that_scales_the_logits_is_refused(by_name, tmp_path, monkeypatch):
    """A remote-code forward that changes the logits (x1.5 here): the probe refuses it, before TRL precomputes the
    reference (a model by name) or before TRL's constructor runs (an instance)."""
    path = remote_llama(tmp_path / "scaled", make_model(seed=0), make_tokenizer(), logit_factor=1.5)
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", lambda *a, **k: pytest.fail("precomputed first"))
    if not by_name:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, **REMOTE_INIT)
        monkeypatch.setattr(DPOTrainer, "__init__", lambda *a, **k: pytest.fail("TRL's constructor ran"))
    with pytest.raises(ValueError, match="RemoteLlamaForCausalLM .*remote code.* its forward's log-probs differ"):
        FastDPOTrainer(model=path if by_name else model,
                       args=config(tmp_path, precompute_ref_log_probs=True, model_init_kwargs=REMOTE_INIT),
                       train_dataset=make_dataset(), processing_class=make_tokenizer())


# ------------------------------------------------------------------------------------------- refused at construction


def unfusable_head():
    model = make_model(seed=0)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    return model


def prompt_tuning():
    from peft import PromptTuningConfig
    return dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


REFUSED = [
    ("torch_compile", dict(torch_compile=True), {}, "torch_compile=True is not supported"),
    ("label_smoothing-unused", dict(label_smoothing=0.1), {}, "label_smoothing=0.1 has no effect"),
    ("ld_alpha+sft", dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5), {}, "ld_alpha with loss_type 'sft'"),
    ("ld_alpha-range", dict(ld_alpha=1.5), {}, r"ld_alpha must be None or a number in \[0, 1\]"),
    ("use_weighting+aot", dict(loss_type="aot", use_weighting=True), {}, r"use_weighting: .* \['aot'\]"),
    ("unfusable-head", {}, dict(model=unfusable_head), "LlamaForCausalLM: the output layer is a Sequential"),
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


# TRL 1.16's words (trl/trainer/dpo_trainer.py): a script matching them keeps matching
TRL_LIGER_DEPRECATION = ("`use_liger_kernel=True` is deprecated and will be removed in v2.0.0. Use the Hub kernels "
                         'instead, with `model_init_kwargs={"use_kernels": True}`.')


def test_use_liger_kernel_is_refused_in_trl_words(tmp_path, monkeypatch):
    monkeypatch.setattr(DPOTrainer, "__init__", lambda *a, **k: pytest.fail("TRL's constructor ran"))
    with pytest.warns(FutureWarning, match=re.escape(TRL_LIGER_DEPRECATION)), \
            pytest.raises(ValueError, match="^" + re.escape(TRL_LIGER_DEPRECATION) + " FastDPOTrainer does not run "
                                            "Liger's kernels"):
        FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path, use_liger_kernel=True),
                       train_dataset=make_dataset(), processing_class=make_tokenizer())


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
