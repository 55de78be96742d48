"""FastDPOTrainer on fastdpo's pair layout (shared prompt + packing) against TRL's own DPOTrainer (padded).

The layout is on by default for the verified classes: each step's logged loss, grad_norm, rewards, log-probs and
num_tokens must agree with DPOTrainer's within the padded FastDPOTrainer tests' RTOL (fp32, CPU), for Llama and
Gemma2 with softcap and sliding window (eager: the dense mask) and Qwen2 with tied embeddings (sdpa: span
attention), on standard, implicit-prompt and conversational data, with a precomputed reference and evaluation,
LoRA, gradient checkpointing, TRL's max_length truncation (both modes) and the prompt cache (long pairs' route). Every
batch must have run the layout named.
The setup and comparison are tests/test_integration_trl.py's.
"""
import dataclasses
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from families import tiny  # noqa: E402
from test_integration_trl import STEPS, assert_same_steps, config, lora_config, one_thread  # noqa: E402,F401
from test_trl_parity import make_dataset, make_model, make_tokenizer  # noqa: E402

from fastdpo.integrations import _trl_layout  # noqa: E402
from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402

MODELS = {"llama": make_model,
          "qwen2-tied": lambda seed: tiny("qwen2-tied", seed),
          "gemma2-softcap": lambda seed: tiny("gemma2-softcap", seed)}


def _words(rng, n):
    return " ".join(f"w{rng.randrange(60)}" for _ in range(n))


def implicit_dataset(pairs=4, seed=2):
    """TRL's implicit-prompt format: chosen and rejected hold the whole text (TRL extracts the shared prefix)."""
    rng = random.Random(seed)
    rows = [(_words(rng, rng.randint(3, 6)), _words(rng, rng.randint(1, 4)), _words(rng, rng.randint(1, 4)))
            for _ in range(pairs)]
    return Dataset.from_dict({"chosen": [f"{p} w58 {c}" for p, c, _ in rows],
                              "rejected": [f"{p} w59 {r}" for p, _, r in rows]})


def conversational_dataset(pairs=4, seed=2):
    rng = random.Random(seed)
    turn = lambda role, n: [{"role": role, "content": _words(rng, n)}]  # noqa: E731
    rows = [(turn("user", rng.randint(2, 5)), turn("assistant", rng.randint(1, 4)),
             turn("assistant", rng.randint(1, 4))) for _ in range(pairs)]
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ 'w57 ' if m['role'] == 'user' else 'w56 ' }}{{ m['content'] }}"
                         "{{ ' </s> ' }}{% endfor %}{% if add_generation_prompt %}w56 {% endif %}")
    return tok


DATA = {"standard": make_dataset, "implicit": implicit_dataset, "conversational": conversational_dataset}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    model: str = "llama"
    data: str = "standard"
    options: dict = dataclasses.field(default_factory=dict)
    eval: bool = False
    peft: bool = False
    route: str = "PackedBatch"    # the layout every batch runs (dict: TRL's padded batch, the fallback)


CASES = [Case(f"{m}-{d}", m, d) for m in MODELS for d in DATA]
CASES += [Case("llama-precompute+eval", options=dict(precompute_ref_log_probs=True), eval=True),
          Case("gemma2-eval", "gemma2-softcap", eval=True),
          Case("qwen2-peft-lora+gradient_checkpointing", "qwen2-tied", options=dict(gradient_checkpointing=True),
               peft=True),
          Case("llama-max_length-keep_start", options=dict(max_length=6)),
          # keep_end cuts the prompt of a pair's longer sequence further: no shared prompt, TRL's padded batches
          Case("qwen2-max_length-keep_end", "qwen2-tied", options=dict(max_length=6, truncation_mode="keep_end"),
               route="dict"),
          Case("gemma2-ld_alpha+use_weighting-ipo", "gemma2-softcap",
               options=dict(loss_type="ipo", ld_alpha=0.3, use_weighting=True)),
          # pairs as if long (fastdpo.layout.prefers_prompt_cache): the prompt cache (eager, no checkpointing)
          Case("llama-prompt_cache+eval", eval=True, route="CacheBatch")]


def train(cls, case: Case, output_dir, calls=None):
    if case.peft:
        pytest.importorskip("peft")
    make, data = MODELS[case.model], DATA[case.data]
    evaluation = dict(eval_strategy="steps", eval_steps=1) if case.eval else {}
    trainer = cls(model=make(seed=0), ref_model=None if case.peft else make(seed=1),
                  args=config(output_dir, **case.options, **evaluation), train_dataset=data(),
                  eval_dataset=data(seed=3) if case.eval else None,
                  processing_class=chat_tokenizer() if case.data == "conversational" else make_tokenizer(),
                  peft_config=lora_config() if case.peft else None)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layout_steps_match_trl_dpo_trainer(case, tmp_path, monkeypatch):
    if case.route == "CacheBatch":
        monkeypatch.setattr(_trl_layout, "prefers_prompt_cache", lambda pairs: True)
    routes = []                                 # per training and evaluation batch: the layout it ran
    count = _trl_layout.positions
    monkeypatch.setattr(_trl_layout, "positions",
                        lambda inputs: routes.append(type(inputs.get(_trl_layout.KEY, {})).__name__) or count(inputs))
    want = train(DPOTrainer, case, tmp_path / "trl")
    got = train(FastDPOTrainer, case, tmp_path / "fastdpo")
    entries = STEPS * (2 if case.eval else 1)
    assert_same_steps(got, want, case.id, entries)
    # every training step and evaluation batch ran the layout (max_length=6 cuts no reply to nothing here)
    assert routes == [case.route] * (STEPS + (STEPS * 2 if case.eval else 0)), routes


def test_padding_free_is_the_layout_and_pair_layout_false_pads(tmp_path):
    """padding_free=True: the layout; pair_layout=False (or compute_metrics, which takes logits): TRL's padded batches."""
    args = dict(ref_model=make_model(seed=1), train_dataset=make_dataset(), processing_class=make_tokenizer())
    on = FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path, padding_free=True), **args)
    assert isinstance(on.data_collator, _trl_layout.PairCollator) and on.padding_free
    off = FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path), pair_layout=False, **args)
    assert type(off.data_collator) is DataCollatorForPreference and not off.padding_free
    metrics = FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path), compute_metrics=lambda p: {}, **args)
    assert type(metrics.data_collator) is DataCollatorForPreference      # compute_metrics takes padded logits
    with pytest.raises(ValueError, match="padding_free=True is the pair layout; it contradicts pair_layout=False"):
        FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path, padding_free=True), pair_layout=False, **args)
    with pytest.raises(ValueError, match="pair_layout must be None"):
        FastDPOTrainer(model=make_model(seed=0), args=config(tmp_path), pair_layout="yes", **args)


def test_unverified_class_pads_by_default_and_refuses_pair_layout_true(tmp_path):
    args = dict(train_dataset=make_dataset(), processing_class=make_tokenizer())
    auto = FastDPOTrainer(model=tiny("gpt2-tied", 0), ref_model=tiny("gpt2-tied", 1), args=config(tmp_path), **args)
    assert type(auto.data_collator) is DataCollatorForPreference
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not among the classes verified .* pair_layout=False"):
        FastDPOTrainer(model=tiny("gpt2-tied", 0), ref_model=tiny("gpt2-tied", 1), args=config(tmp_path),
                       pair_layout=True, **args)


@pytest.mark.parametrize("mode,multiple", [("keep_start", None), ("keep_end", None), ("keep_start", 8)])
def test_collator_counts_trl_tokens_and_falls_back_where_the_layout_cannot_hold(mode, multiple):
    """num_tokens equals TRL's attention-mask sum under max_length, and the padded count its input_ids' numel; a
    pair truncated to an empty reply (keep_start) or to different prompts (keep_end) makes the batch TRL's padded
    one."""
    rng = random.Random(0)
    trl = DataCollatorForPreference(pad_token_id=0, max_length=9, truncation_mode=mode, pad_to_multiple_of=multiple)
    collate = _trl_layout.PairCollator(trl, _trl_layout.PairLayout(span=True, prompt_cache=False))
    laid_out = 0
    for _ in range(40):
        examples = [{k: [rng.randrange(3, 60) for _ in range(rng.randint(1, n))]
                     for k, n in (("prompt_ids", 11), ("chosen_ids", 5), ("rejected_ids", 5))} for _ in range(2)]
        got, want = collate(examples), trl(examples)
        if _trl_layout.is_layout_batch(got):
            laid_out += 1
            assert got["num_tokens"].item() == want["attention_mask"].sum().item()
            assert got[_trl_layout.PADDED].item() == want["input_ids"].numel()
            # scored: TRL's completion tokens but a sequence's first (nothing predicts it)
            assert (got[_trl_layout.KEY].labels != -100).sum() == want["completion_mask"][:, 1:].sum()
        else:
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert 5 < laid_out < 40, laid_out


@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_num_input_tokens_seen_counts_what_dpo_trainer_counts(mode, tmp_path):
    """include_num_input_tokens_seen: transformers looks for input_ids, which a layout batch has none of; the count
    is TRL's padded batch's all the same (all positions, or the non-padding ones)."""
    seen = {}
    for cls in (DPOTrainer, FastDPOTrainer):
        trainer = cls(model=make_model(seed=0), ref_model=make_model(seed=1), train_dataset=make_dataset(),
                      args=config(tmp_path / cls.__name__, include_num_input_tokens_seen=mode),
                      processing_class=make_tokenizer())
        trainer.train()
        seen[cls] = trainer.state.num_input_tokens_seen
    assert isinstance(trainer.data_collator, _trl_layout.PairCollator)
    assert seen[FastDPOTrainer] == seen[DPOTrainer] > 0, seen


def test_two_process_ddp_layout_matches_dpo_trainer(tmp_path):
    """torchrun, 2 CPU processes (gloo), 1 pair per process per step: FastDPOTrainer with the layout (span attention)
    logs DPOTrainer's steps under DDP (gradients all-reduced, metrics gathered across processes)."""
    script = str(pathlib.Path(__file__).with_name("trl_ddp_run.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "histories.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29531", script, str(tmp_path), str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    histories = json.loads(out.read_text())
    assert_same_steps(histories["FastDPOTrainer"], histories["DPOTrainer"], "ddp", STEPS)


@pytest.mark.parametrize("pair_layout", [True, False], ids=["layout", "padded"])
def test_a_batch_that_scores_nothing_trains_as_dpo_trainer(pair_layout, tmp_path):
    """One pair per step, some pairs one token long (an empty prompt, a reply of only EOS): such a batch scores
    nothing, and DPOTrainer logs log-probs 0, loss log 2 and grad_norm 0 for it; so does FastDPOTrainer (it used to
    stop mid-run on an empty head input)."""
    data = Dataset.from_dict({"prompt": ["", "w1 w2", "", "w3"], "chosen": ["", " w4", "", " w5 w6"],
                              "rejected": ["", " w7", " w8", " w9"]})
    histories = {}
    for cls, extra in ((DPOTrainer, {}), (FastDPOTrainer, dict(pair_layout=pair_layout))):
        args = config(tmp_path / cls.__name__)
        args.per_device_train_batch_size, args.max_steps = 1, len(data)
        trainer = cls(model=make_model(seed=0), ref_model=make_model(seed=1), args=args, train_dataset=data,
                      processing_class=make_tokenizer(), **extra)
        trainer.train()
        histories[cls] = [h for h in trainer.state.log_history if "loss" in h]
    assert histories[DPOTrainer][0]["grad_norm"] == 0.0 and histories[DPOTrainer][0]["logps/chosen"] == 0.0
    assert_same_steps(histories[FastDPOTrainer], histories[DPOTrainer], "scores nothing", len(data))
