"""FastDPOTrainer under accelerate's sequence parallelism (DeepSpeed, ``sp_size=2``) gives the single process's DPO.

One launch (``torchrun --nproc-per-node 2`` of this file, gloo, ``DS_ACCELERATOR=cpu``) trains each case with
``ParallelismConfig(sp_size=2)`` under DeepSpeed ZeRO-3 or ZeRO-2, the pair layout on (span attention), fp32: both
ranks form one sequence-parallel group, so each step is one rank's batch, split along the sequence. The pytest
process trains the same cases on one process without DeepSpeed (the same model, data, seed, and batches in the same
order). Every step's loss, grad_norm, rewards and logps (and the evaluation's) must agree within test_trl_scale's
RTOL, num_tokens and accuracies exactly; a run resumed from the step-1 checkpoint must give the same step 2.
Measured (2026-12-07, this CPU): worst relative difference 5.0e-6 (the evaluation's rewards/rejected after step 2,
-0.0399; printed under pytest -s). The test takes about 50 s on 2 busy cores (the launch 40 s); the setup
(tokenizer, data, model) is test_trl_scale's.

Checked by hand that it fails when it should (2026-12-07, this CPU): with ``SumOverGroup`` returning each rank's own
partial sums, step 1's loss is 0.835 instead of 0.977; with the gradient factor left at 1 under ZeRO-3 the step-1
grad_norm is 11.02 instead of 22.04, with a factor 2 under ZeRO-2 44.08; with a resumed loader that skips nothing,
the resumed step 2's loss is 0.040 instead of 0.918.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

SP = 2
# case id -> options: the ZeRO stage, ref (a separate reference model; else the policy's own, on the fly or
# precomputed), precompute (precompute_ref_log_probs, run unsplit on each rank's own batches), lora (PEFT LoRA on q
# and v, initialised off zero; the reference is the base), eval (an evaluation
# after the last step, unsplit on each rank's own batches), resume (a checkpoint after step 1, from which a second
# trainer resumes: its step 2 must be the uninterrupted one), dense (the pair layout's dense mask through sdpa, the
# route off the CPU, where DeepSpeed's attention wrapper would drop it; else span attention), checkpointing
# (gradient checkpointing: the backward's recompute attends through the split attention; the dense route)
CASES = {"zero3-ref-eval-checkpointing": dict(stage=3, ref=True, eval=True, dense=True, checkpointing=True),
         "zero3-precompute-lora": dict(stage=3, precompute=True, lora=True),
         "zero2-ref-resume": dict(stage=2, ref=True, resume=True)}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
COMPARED = ("loss", "grad_norm", *METRICS, "num_tokens")
EVAL_COMPARED = ("eval_loss", *(f"eval_{k}" for k in METRICS))


def _model(seed: int):
    from test_trl_scale import _model as make
    model = make(seed, tied=False)
    model.config._attn_implementation = "sdpa"       # the core attention under accelerate's sequence parallelism
    return model


def _args(case: dict, out: Path, sp: bool):
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig
    from test_trl_parity import BETA
    from test_trl_scale import PAIRS_PER_STEP, STEPS, zero
    from trl import DPOConfig
    options = {}
    if case.get("eval"):
        options = dict(eval_strategy="steps", eval_steps=STEPS, per_device_eval_batch_size=PAIRS_PER_STEP)
    if sp:
        handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa")
        options |= dict(deepspeed=zero(case["stage"]), accelerator_config={"use_configured_state": True},
                        ddp_backend="gloo",
                        parallelism_config=ParallelismConfig(sp_size=SP, sp_backend="deepspeed", sp_handler=handler))
    if case.get("resume") and sp:
        options |= dict(save_strategy="steps", save_steps=1)
    return DPOConfig(output_dir=str(out), report_to=[], bf16=False, fp16=False,
                     gradient_checkpointing=case.get("checkpointing", False),
                     per_device_train_batch_size=PAIRS_PER_STEP, max_steps=STEPS, learning_rate=1e-2,
                     logging_steps=1, beta=BETA, seed=0, disable_tqdm=True, **{"save_strategy": "no", **options},
                     precompute_ref_log_probs=case.get("precompute", False))


def _train(case_id: str, out: Path, sp: bool, resume: bool = False) -> list:
    from test_trl_parity import make_dataset, make_tokenizer
    from test_trl_scale import _dataset

    from fastdpo.integrations import _trl_layout
    from fastdpo.integrations.trl import FastDPOTrainer
    case = CASES[case_id]
    dense = mock.patch.object(_trl_layout, "span_unavailable", lambda *a: "the test's dense case")
    lora = None
    if case.get("lora"):
        from peft import LoraConfig
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM", init_lora_weights=False)
    with dense if case.get("dense") else contextlib.nullcontext():
        trainer = FastDPOTrainer(model=_model(0), ref_model=_model(1) if case.get("ref") else None, peft_config=lora,
                                 args=_args(case, out / case_id, sp), train_dataset=_dataset(out),
                                 eval_dataset=make_dataset(seed=3) if case.get("eval") else None,
                                 processing_class=make_tokenizer())
    assert trainer._fastdpo_layout.span != case.get("dense", False), trainer._fastdpo_layout
    trainer.train(resume_from_checkpoint=str(out / case_id / "checkpoint-1") if resume else None)
    return [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]


def worker(out: str) -> None:
    import deepspeed.ops
    import torch
    import transformers
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups
    from test_trl_scale import _engine_state
    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False        # see test_trl_scale.worker
    results = {}
    runs = [(case_id, False) for case_id in CASES] + [(c, True) for c, case in CASES.items() if case.get("resume")]
    for case_id, resume in runs:
        _engine_state("zero")
        # the previous trainer's sequence-parallel groups (DeepSpeed keeps one set per process)
        parallel_state_sp._release_sequence_parallel_groups()
        groups.mpu = None
        if resume and not hasattr(transformers.Trainer, "get_resumed_dataloader"):      # transformers 5.17
            try:
                _train(case_id, Path(out), sp=True, resume=resume)
            except ValueError as e:
                results[case_id + "/resumed"] = str(e)
            continue
        results[case_id + "/resumed" * resume] = _train(case_id, Path(out), sp=True, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))


def _launch(out: Path) -> dict:
    from test_trl_scale import NPROC, launch
    assert NPROC == SP                  # both ranks form the one group
    return launch(str(Path(__file__)), out, 29400 + os.getpid() % 100)


@pytest.mark.slow
def test_sequence_parallel_steps_equal_the_single_process(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("deepspeed")
    import transformers
    from accelerate.state import AcceleratorState
    from test_trl_scale import RTOL, STEPS
    split = _launch(tmp_path / "sp")
    worst = (0.0, "")                         # the measured agreement, printed (pytest -s)
    for case_id in CASES:
        AcceleratorState._reset_state(reset_partial_state=True)
        want, got = _train(case_id, tmp_path / "single", sp=False), split[case_id]
        assert len(got) == len(want) == STEPS + bool(CASES[case_id].get("eval")), (
            f"{case_id}: {len(got)} and {len(want)} logged entries")
        runs = {case_id: got}
        if CASES[case_id].get("resume") and not hasattr(transformers.Trainer, "get_resumed_dataloader"):
            assert "resume_from_checkpoint needs a transformers" in split[case_id + "/resumed"]     # refused
        elif CASES[case_id].get("resume"):    # the resumed run: step 1 from the checkpoint's history, step 2 its own
            resumed = split[case_id + "/resumed"]
            assert [h["step"] for h in resumed] == list(range(1, STEPS + 1)), resumed
            runs[case_id + "/resumed"] = resumed
        for run, history in runs.items():
            for entry, (g, w) in enumerate(zip(history, want)):
                # num_tokens: TRL's running count starts again at 0 in a resumed run (TRL's DPOTrainer alike)
                keys = COMPARED if "loss" in w else EVAL_COMPARED
                for key in keys[:-1] if run.endswith("/resumed") and "loss" in w else keys:
                    what = f"{run} entry {entry} {key}: sp_size={SP} {g[key]!r} vs one process {w[key]!r}"
                    if key.endswith(("rewards/accuracies", "num_tokens")):
                        assert g[key] == w[key], what
                    else:
                        scale = abs(w[key])
                        if key.endswith("rewards/margins"):
                            prefix = key[:-len("rewards/margins")]
                            scale = max(scale, abs(w[prefix + "rewards/chosen"]), abs(w[prefix + "rewards/rejected"]))
                        worst = max(worst, (abs(g[key] - w[key]) / max(scale, 1e-30), what))
                        assert abs(g[key] - w[key]) <= RTOL * scale, what
    print(f"\nworst relative difference from the single process: {worst[0]:.1e} ({worst[1]})")

# ------------------------------------------------------------------------------ refused up front, in one line each

def _refused(tmp_path, monkeypatch, sp=SP, model=None, ref_model=None, pair_layout=None, attention="sdpa",
             **options) -> str:
    """FastDPOTrainer's error under ``ParallelismConfig(sp_size=sp)`` (sp_attn_implementation ``attention``),
    raised before TRL's constructor runs."""
    pytest.importorskip("trl")
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig
    from test_integration_trl import config
    from test_trl_parity import make_dataset, make_tokenizer
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer
    monkeypatch.setattr(DPOTrainer, "__init__", lambda *a, **k: pytest.fail("TRL's constructor ran"))
    handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation=attention)
    parallelism = ParallelismConfig(sp_size=sp, sp_backend="deepspeed", sp_handler=handler)
    if options.pop("cp", False):
        parallelism = ParallelismConfig(cp_size=2)
    with pytest.raises(ValueError) as e:
        FastDPOTrainer(model=model if model is not None else _model(0), ref_model=ref_model,
                       args=config(tmp_path, parallelism_config=parallelism, **options), pair_layout=pair_layout,
                       train_dataset=make_dataset(), processing_class=make_tokenizer())
    assert "\n" not in str(e.value)
    return str(e.value)


def test_what_cannot_be_split_exactly_is_refused(tmp_path, monkeypatch):
    from test_trl_parity import make_model, make_moe
    refused = functools.partial(_refused, tmp_path, monkeypatch)
    head = "FastDPOTrainer: sp_size=2 (DPOConfig.parallelism_config): "
    assert refused(pair_layout=False).startswith(head + "pair_layout=False is not supported under sequence "
                                                 "parallelism: FastDPOTrainer splits the pair layout's packed rows")
    assert refused(disable_dropout=False).startswith(head + "disable_dropout=False is not supported under sequence "
                                                     "parallelism")
    assert refused(use_weighting=True) == head + "use_weighting=True (WPO) is not supported under sequence parallelism"
    assert refused(sp=4) == ("FastDPOTrainer: sp_size=4: the model num_attention_heads (2) must be divisible by it "
                             "(each rank attends with a 1/4 of the heads)")
    assert refused(model=make_moe("mixtral", 0)).startswith(
        "FastDPOTrainer: sp_size=2: the model MixtralForCausalLM is not among the classes verified under it")
    eager = ("runs 'eager' attention and ParallelismConfig's sp_attn_implementation is 'sdpa': under sequence "
             "parallelism both must be 'sdpa'")
    assert refused(model=make_model(0)).startswith("FastDPOTrainer: sp_size=2: the model " + eager)
    assert refused(ref_model=make_model(1)).startswith("FastDPOTrainer: sp_size=2: the ref_model " + eager)
    assert refused(attention="flash_attention_2").startswith(
        "FastDPOTrainer: sp_size=2: the model runs 'sdpa' attention and ParallelismConfig's sp_attn_implementation "
        "is 'flash_attention_2'")
    assert refused(cp=True).startswith("FastDPOTrainer: cp_size=2 (DPOConfig.parallelism_config) is not supported: "
                                       "FSDP2's context parallelism (ring attention) takes no custom mask")


def test_resume_is_refused_where_the_trainer_cannot_skip_the_groups_batches():
    """transformers 5.17's Trainer skips a resumed epoch's batches with accelerate's skip_first_batches, which
    rebuilds the loader under the group's (measured there: the resumed step 2's loss 0.506 against 0.918)."""
    import types

    from fastdpo.integrations import _trl_sequence
    old, new = type("Old", (), {}), type("New", (), {"get_resumed_dataloader": None})
    args = types.SimpleNamespace(ignore_data_skip=False)
    with pytest.raises(ValueError, match=r"^FastDPOTrainer: sp_size=2: resume_from_checkpoint needs a transformers "
                                         "whose Trainer has get_resumed_dataloader"):
        _trl_sequence.check_resume(2, "out/checkpoint-1", args, old)
    _trl_sequence.check_resume(2, "out/checkpoint-1", args, new)
    _trl_sequence.check_resume(1, "out/checkpoint-1", args, old)
    _trl_sequence.check_resume(2, None, args, old)
    _trl_sequence.check_resume(2, True, types.SimpleNamespace(ignore_data_skip=True), old)


if __name__ == "__main__":
    worker(sys.argv[1])
