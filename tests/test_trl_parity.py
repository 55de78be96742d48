"""Parity with TRL: fastdpo's losses equal what TRL's own DPOTrainer computes.

For every DPOTrainer loss type (plus f-divergences, a weighted mix, LD-DPO's ``ld_alpha`` and WPO's
``use_weighting``), one tiny random Llama and one collated batch go through TRL's real
``DPOTrainer.compute_loss`` (its fused LM head, its reference forward, its loss code and its logged metrics).
fastdpo then gets the same model, batch and TRL's own reference log-probs: ``dpo_loss`` on
``fastdpo.sequence_logps`` sums (LD-weighted by ``ld_token_weights``, with ``wpo_weights`` as pair weights),
and ``linear_dpo_loss`` on the hidden states (given ``ld_alpha``/``use_weighting`` itself). Loss and every
metric must agree within 1e-5 relative in fp32.

No downloads: the tokenizer is a WordLevel one built here, the model is built
from a config. ``simpo`` is TRL's CPOTrainer loss, not a DPOTrainer one: not covered.
"""
import dataclasses
import os
import random

import pytest

pytest.importorskip("trl")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo import loss as L  # noqa: E402
from fastdpo import reference as R  # noqa: E402

RTOL = 1e-5          # fp32 parity with TRL; never loosened per case
BETA = 0.2           # not TRL's default 0.1, so a beta that is not passed through shows
PAIRS = 4
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}   # exo_pair needs > 0 in TRL; robust lies in [0, 0.5)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    options: dict      # passed as-is to DPOConfig and to fastdpo's losses


TRL_LOSS_TYPES = [t for t in R.LOSS_TYPES if t != "simpo"]
CASES = [Case(t, {"loss_type": t, "label_smoothing": SMOOTHING.get(t, 0.0)}) for t in TRL_LOSS_TYPES]
CASES += [Case(f"sigmoid-{fd}", {"loss_type": "sigmoid", "f_divergence_type": fd}) for fd in
          ("forward_kl", "js_divergence")]
CASES += [Case("sigmoid-alpha_divergence-0.3",
               {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3})]
CASES += [Case("mix-sigmoid+bco_pair+sft",
               {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]})]
CASES += [Case("sigmoid-ld_alpha-0.5", {"loss_type": "sigmoid", "ld_alpha": 0.5}),
          Case("sigmoid-use_weighting", {"loss_type": "sigmoid", "use_weighting": True}),
          Case("ipo-ld_alpha-0.3+use_weighting", {"loss_type": "ipo", "ld_alpha": 0.3, "use_weighting": True})]
APIS = ("dpo_loss", "linear_dpo_loss")


# ---------------------------------------------------------------------------------------------- the setup


def make_tokenizer():
    """Whitespace WordLevel tokenizer over w0..w59 with <pad>, </s> (eos) and <unk>: 63 ids."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])    # split out before pre-tokenizing: "w5</s>" -> w5, </s>
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_dataset(pairs=PAIRS, seed=2):
    """TRL's standard (non-conversational) preference format; prompts of 2-5 words, completions of 1-5 (+ eos)."""
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(60)}" for _ in range(n))  # noqa: E731
    rows = [(words(rng.randint(2, 5)), " " + words(rng.randint(1, 5)), " " + words(rng.randint(1, 5)))
            for _ in range(pairs)]
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})


def make_model(seed):
    """Tiny random Llama. A wide lm_head init makes the next-token distributions peaked enough that policy and
    reference log-probs differ by nats, so rewards, margins and losses are far from their degenerate values."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.float()


MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")


def make_moe(family: str, seed: int):
    """Tiny random MoE causal LM of a TRL test family (2 layers, 4 experts, 2 per token), fp32, eager attention;
    the lm_head widened as make_model's."""
    from transformers import (GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None, num_experts_per_tok=2)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, head_dim=8, intermediate_size=32, moe_intermediate_size=16, num_experts=4)
        cls = Qwen3MoeForCausalLM
    elif family == "mixtral":
        config, cls = MixtralConfig(**common, intermediate_size=32, num_local_experts=4), MixtralForCausalLM
    elif family == "gpt_oss":
        config = GptOssConfig(**common, head_dim=8, intermediate_size=16, num_local_experts=4,
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0))
        cls = GptOssForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    model = cls(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.float()


def run_trl(case: Case, output_dir):
    """One TRL DPOTrainer for this case: its collated batch, its loss and logged metrics, and what fastdpo needs."""
    args = DPOConfig(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=PAIRS, beta=BETA, seed=0,
                     save_strategy="no", logging_strategy="no", **case.options)
    trainer = DPOTrainer(model=make_model(seed=0), ref_model=make_model(seed=1), args=args,
                         train_dataset=make_dataset(), processing_class=make_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()                      # TRL logs under "train" when the policy is in training mode
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, batch)
    metrics = {k: trainer._metrics["train"][k] for k in METRICS}
    with torch.no_grad():
        # TRL's own per-sequence reference sums through its fused LM head: what _compute_loss subtracts (the same
        # model call and the same sum), handed to fastdpo unchanged.
        ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    return dict(trainer=trainer, batch=batch, loss=loss.detach(), metrics=metrics, ref=(ref_c, ref_r),
                hidden=hidden, weight=model.get_output_embeddings().weight.detach())


def trl_policy_logps(trl):
    """TRL's per-sequence policy log-probs [2B] through its fused LM head (the sums _compute_loss takes)."""
    trainer = trl["trainer"]
    with torch.no_grad():
        return torch.cat(trainer.compute_ref_log_probs(trainer.model, trl["batch"]))


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory):
    """Case id -> TRL's results, each trainer built once and shared by both fastdpo entry points."""
    cache = {}

    def get(case: Case):
        if case.id not in cache:
            cache[case.id] = run_trl(case, tmp_path_factory.mktemp(case.id.replace("+", "_")))
        return cache[case.id]
    return get


def shifted(trl):
    """hidden [2B, T-1, D] and labels [2B, T-1]: hidden[:, t] predicts input_ids[:, t + 1]; only completion
    tokens are scored (prompt and padding are -100), exactly the labels TRL builds and shifts."""
    batch = trl["batch"]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    return trl["hidden"][:, :-1], labels


def assert_rel(actual, expected, what):
    actual, expected = float(actual), float(expected)
    assert abs(actual - expected) <= RTOL * abs(expected), (
        f"{what}: fastdpo {actual!r} vs TRL {expected!r} (relative error "
        f"{abs(actual - expected) / max(abs(expected), 1e-30):.2e} > {RTOL:g})")


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_loss_and_metrics_match_trl_dpo_trainer(trl_results, case, api):
    trl = trl_results(case)
    batch = trl["batch"]
    hidden, labels = shifted(trl)
    ref_c, ref_r = trl["ref"]
    # The length-normalized losses: TRL's ipo and sigmoid_norm divide by completion_mask.sum(1) (the unshifted
    # mask) and its sft averages over the shifted mask; fastdpo counts scored labels, i.e. the shifted mask. They
    # agree here because position 0 is always a prompt token (every prompt is non-empty), so it is never counted.
    lengths = (labels != -100).sum(1)
    assert torch.equal(lengths, batch["completion_mask"].sum(1)), "test setup: TRL and fastdpo lengths differ"
    assert (lengths > 0).all() and batch["completion_mask"][:, 0].eq(0).all()

    opts = dict(case.options, beta=BETA)
    if api == "dpo_loss":
        ld_alpha, use_weighting = opts.pop("ld_alpha", None), opts.pop("use_weighting", False)
        logps, token = fastdpo.sequence_logps(hidden, trl["weight"], labels, return_token_logps=True)
        if ld_alpha is not None:
            logps = (token * L.ld_token_weights(labels, ld_alpha)).sum(1)
        if use_weighting:
            opts["pair_weights"] = L.wpo_weights(hidden, trl["weight"], labels)
        pc, pr = logps.chunk(2)
        lc, lr = lengths.chunk(2)
        loss, metrics = L.dpo_loss(pc, pr, ref_c, ref_r, chosen_lengths=lc, rejected_lengths=lr, **opts)
    else:
        loss, metrics = L.linear_dpo_loss(hidden, trl["weight"], labels, ref_c, ref_r, **opts)

    assert loss.dtype == torch.float32 and trl["loss"].dtype == torch.float32
    assert_rel(loss, trl["loss"], f"{case.id} loss")
    assert set(METRICS) <= set(metrics)
    for key in METRICS:
        (want,) = trl["metrics"][key]           # one compute_loss call logs one value per metric
        if key == "rewards/accuracies":
            assert metrics[key].item() == want, f"{case.id} {key}: fastdpo {metrics[key].item()} vs TRL {want}"
        else:
            assert_rel(metrics[key], want, f"{case.id} {key}")


def test_setup_is_not_degenerate(trl_results):
    """The parity above means something only if the log-ratios are nats apart and the pairs disagree."""
    trl = trl_results(CASES[0])
    (pc, pr), (rc, rr) = trl_policy_logps(trl).chunk(2), trl["ref"]
    margins = (pc - rc) - (pr - rr)
    assert margins.abs().min() > 0.1, margins
    # aot pairs the sorted policy margins with the sorted reference margins, aot_unpaired the sorted chosen
    # log-ratios with the sorted rejected ones: where both sorts give the same order they reduce to sigmoid.
    assert not torch.equal((pc - pr).argsort(), (rc - rr).argsort()), "aot would equal sigmoid on this batch"
    assert not torch.equal((pc - rc).argsort(), (pr - rr).argsort()), "aot_unpaired would equal sigmoid"
    assert 0.0 < trl["metrics"]["rewards/accuracies"][0] < 1.0, "want pairs on both sides of the margin"
    assert len(set(trl["batch"]["completion_mask"].sum(1).tolist())) > 1, "want completions of varied lengths"
    assert (trl["batch"]["attention_mask"] == 0).any(), "want padding in the batch"


def test_sequence_logps_match_trl_fused_head(trl_results):
    """Per sequence, fastdpo.sequence_logps equals TRL's fused-LM-head sum for the policy."""
    trl = trl_results(CASES[0])
    hidden, labels = shifted(trl)
    got = fastdpo.sequence_logps(hidden, trl["weight"], labels)
    want = trl_policy_logps(trl)
    for i, (g, w) in enumerate(zip(got.tolist(), want.tolist())):
        assert_rel(g, w, f"sequence {i} log-prob")
