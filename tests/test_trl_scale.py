"""FastDPOTrainer under DeepSpeed ZeRO-2/3 and FSDP2, 2 processes on the CPU, against TRL's DPOTrainer there.

One launch (``torchrun --nproc-per-node 2`` of this file, gloo; DeepSpeed with ``DS_ACCELERATOR=cpu``) runs the
engines one after another (FSDP2 first: a ZeRO-3 trainer leaves transformers' ZeRO-3 switch behind) and trains each
of their cases twice, DPOTrainer then FastDPOTrainer, on the same tiny
random Llama, data, seed and DPOConfig (fp32), and saves both models. Every step's logged loss, grad_norm and
rewards/logps metric must agree within RTOL, and the saved weights within WEIGHT_RTOL of their scale (the measured
agreement is printed under pytest -s). The launch takes about 45 s on 2 quiet cores. The setup
(tokenizer, data, model) is tests/test_trl_parity.py's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STEPS, PAIRS_PER_STEP, NPROC = 2, 2, 2
# Measured (2026-12-06, this CPU): worst per-step relative difference 1.5e-6 (every engine), worst saved-weight
# difference 4.6e-5 of the tensor's max |value| (AdamW at lr 1e-2 turns tiny gradient differences of near-zero
# gradients into lr-sized steps). Never loosened per case.
RTOL = 1e-5               # per step, fp32 (tests/test_integration_trl.py: 1e-4)
WEIGHT_RTOL = 1e-4        # saved weights: max |difference| relative to the tensor's max |value|
COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "num_tokens")

ZERO_BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
             "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def zero(stage: int) -> dict:
    # persistence thresholds 0: ZeRO-3 partitions every parameter of the tiny model (by default it keeps those under
    # 1e5 elements whole on every rank)
    return {**ZERO_BASE, "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True,
                                               "stage3_param_persistence_threshold": 0,
                                               "stage3_model_persistence_threshold": 0}}


def fsdp2(reshard: bool) -> dict:
    return dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": reshard,
                                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                "state_dict_type": "FULL_STATE_DICT"})


# engine -> its cases: (case id, options). Options: tied (tied embeddings), ref (a separate reference model),
# lora (PEFT LoRA on q and v; the reference is the base; TRL's constructor refuses LoRA on the lm_head), precompute,
# and the engine's config.
LAUNCHES = {
    "fsdp2": [("ref-reshard", dict(ref=True, reshard=True)),
              ("precompute-tied-no_reshard", dict(tied=True, precompute=True, reshard=False, ref=True)),
              ("lora-reshard", dict(lora=True, reshard=True))],
    "zero3": [("ref-tied", dict(tied=True, ref=True)),
              ("pair_layout-ref", dict(ref=True, layout=True)),
              ("precompute", dict(precompute=True)),
              ("lora", dict(lora=True))],
    "zero2": [("ref", dict(ref=True)),
              ("lora+precompute", dict(lora=True, precompute=True))],
}


# ------------------------------------------------------------------------------------------- the worker (per rank)

def _engine_args(engine: str, case: dict) -> dict:
    if engine.startswith("zero"):
        return dict(deepspeed=zero(int(engine[-1])))
    return fsdp2(case.get("reshard", True))


def _model(seed: int, tied: bool):
    import torch
    from test_trl_parity import make_model
    model = make_model(seed)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5)
    return model


def _dataset(out: Path):
    """The pairs from a file: TRL's precomputed reference log-probs go to the dataset's cache file, which every rank
    must find (an in-memory dataset's cache is a per-process temporary folder)."""
    from datasets import load_dataset
    from test_trl_parity import make_dataset
    path = out / "pairs.json"
    if not path.exists():
        tmp = out / f"pairs.{os.environ.get('RANK', '0')}.json"
        make_dataset(pairs=STEPS * PAIRS_PER_STEP * NPROC).to_json(str(tmp))
        os.replace(tmp, path)                   # the same content from every rank
    return load_dataset("json", data_files=str(path), split="train",
                        cache_dir=str(out / "hf_cache"))


def _engine_state(engine: str) -> None:
    """accelerate 1.16 sets up DeepSpeed and FSDP only where torch sees an accelerator device: on a CPU, use_cpu=True
    gives plain DDP with both silently off, and without it the processes do not form a group. The worker sets up
    accelerate's state as a GPU launch would (DeepSpeed; for FSDP a multi-device group) over gloo on the CPU, and
    the trainers reuse it (accelerator_config use_configured_state); every trainer gets its own plugin."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    # the previous trainer's plugins and engine type (the process group stays, and PartialState takes it again)
    AcceleratorState._reset_state(reset_partial_state=True)
    if engine.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    state = PartialState(backend="gloo")
    if engine.startswith("fsdp"):
        state.distributed_type = DistributedType.MULTI_GPU      # what AcceleratorState turns into FSDP


def _train(cls, engine: str, case: dict, out: Path) -> list:
    from peft import LoraConfig
    from test_trl_parity import BETA, make_tokenizer
    from trl import DPOConfig
    _engine_state(engine)
    args = DPOConfig(accelerator_config={"use_configured_state": True}, output_dir=str(out), report_to=[],
                     bf16=False, fp16=False, gradient_checkpointing=False,
                     per_device_train_batch_size=PAIRS_PER_STEP, max_steps=STEPS, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", beta=BETA, seed=0, disable_tqdm=True, ddp_backend="gloo",
                     precompute_ref_log_probs=case.get("precompute", False), **_engine_args(engine, case))
    lora = None
    if case.get("lora"):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    # the padded batches (TRL's) unless the case asks for fastdpo's pair layout (FastDPOTrainer's default)
    layout = dict(pair_layout=case.get("layout", False)) if cls.__name__ == "FastDPOTrainer" else {}
    trainer = cls(**layout, model=_model(0, case.get("tied", False)),
                  ref_model=_model(1, case.get("tied", False)) if case.get("ref") else None, args=args,
                  train_dataset=_dataset(out.parent.parent), processing_class=make_tokenizer(),
                  peft_config=lora)
    trainer.train()
    trainer.save_model(str(out / "saved"))
    head = trainer.accelerator.unwrap_model(trainer.model)
    head = (head.get_base_model() if hasattr(head, "get_base_model") else head).lm_head.weight
    # what the engine left outside the forward: ZeRO-3's placeholder, FSDP2's shard
    plugin = trainer.accelerator.state.deepspeed_plugin
    sharding = dict(deepspeed=trainer.is_deepspeed_enabled, fsdp=trainer.is_fsdp_enabled,
                    zero_stage=plugin.zero_stage if plugin else None, head_class=type(head).__name__,
                    head_numel=head.numel(), head_ds_status=str(getattr(head, "ds_status", None)))
    return [h for h in trainer.state.log_history if "loss" in h], sharding


def worker(out: str) -> None:
    import torch
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer
    torch.set_num_threads(1)
    if importlib.util.find_spec("deepspeed"):
        import deepspeed.ops
        # DeepSpeed builds its shared-memory all-reduce (a C++ op: minutes on a fresh 2-core machine) when its
        # communication starts; only its inference all-reduce uses it, never ZeRO's training collectives, which
        # stay torch.distributed's (gloo) either way. Marked incompatible, as DeepSpeed marks it off Linux.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    results = {}
    for engine, cases in LAUNCHES.items():
        if engine.startswith("zero") and not importlib.util.find_spec("deepspeed"):
            continue
        for case_id, case in cases:
            for name, cls in (("trl", DPOTrainer), ("fastdpo", FastDPOTrainer)):
                start = time.perf_counter()
                history, sharding = _train(cls, engine, case, Path(out) / engine / case_id / name)
                results.setdefault(engine, {}).setdefault(case_id, {})[name] = dict(
                    history=history, sharding=sharding, seconds=time.perf_counter() - start)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------------- the tests

def launch(script: str, out: Path, port: int) -> dict:
    """``torchrun`` of ``script``'s worker over NPROC CPU processes (gloo; DeepSpeed on the CPU), offline, writing
    ``out``/results.json -> its contents."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC), "--master-port",
               str(port), script, str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple:
    """The one launch: (its folder, {engine: results})."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("scale")
    yield out, launch(str(Path(__file__)), out, 29500 + os.getpid() % 1000)
    shutil.rmtree(out, ignore_errors=True)


def _state(path: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    assert files, f"nothing saved in {path}: {sorted(p.name for p in path.iterdir())}"
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


WORST = {"steps": 0.0, "weights": 0.0}      # the measured agreement, printed (pytest -s)


def _assert_rel(got, want, what, scale=None):
    scale = abs(want) if scale is None else scale
    WORST["steps"] = max(WORST["steps"], abs(got - want) / max(scale, 1e-30))
    assert abs(got - want) <= RTOL * scale, (
        f"{what}: FastDPOTrainer {got!r} vs DPOTrainer {want!r} (error {abs(got - want):.2e} relative to "
        f"{scale:.3g}: {abs(got - want) / max(scale, 1e-30):.2e} > {RTOL:g})")


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(LAUNCHES))
def test_engine_matches_trl_dpo_trainer(engine, launched):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    tmp_path, results = launched
    tmp_path, results = tmp_path / engine, results[engine]
    for case_id, _ in LAUNCHES[engine]:
        want, got = results[case_id]["trl"]["history"], results[case_id]["fastdpo"]["history"]
        sharding = results[case_id]["fastdpo"]["sharding"]
        assert sharding == results[case_id]["trl"]["sharding"], f"{engine} {case_id}: {sharding}"
        assert sharding["deepspeed"] == engine.startswith("zero") and sharding["fsdp"] == (engine == "fsdp2")
        if engine == "zero3":       # the lm_head weight outside its forward: ZeRO-3's empty placeholder
            assert sharding["head_numel"] == 0, sharding
        if engine == "fsdp2":       # FSDP2's shard
            assert sharding["head_class"] == "DTensor", sharding
        assert len(got) == len(want) == STEPS, f"{engine} {case_id}: {len(got)} and {len(want)} logged steps"
        for step, (g, w) in enumerate(zip(got, want)):
            for key in COMPARED:
                what = f"{engine} {case_id} step {step} {key}"
                if key in ("rewards/accuracies", "num_tokens"):
                    assert g[key] == w[key], f"{what}: FastDPOTrainer {g[key]} vs DPOTrainer {w[key]}"
                elif key == "rewards/margins":
                    _assert_rel(g[key], w[key], what, max(abs(w[key]), abs(w["rewards/chosen"]),
                                                          abs(w["rewards/rejected"])))
                else:
                    _assert_rel(g[key], w[key], what)
        if dict(LAUNCHES[engine])[case_id].get("layout"):
            # the pair layout sums in another order: its gradients differ from the padded ones by ~1e-6 relative,
            # which AdamW's normalisation turns into lr-sized steps on near-zero gradients (measured 1.5e-5 of a
            # tensor's scale after 2 steps at lr 1e-2): its steps are compared above, not its weights
            continue
        want_state = _state(tmp_path / case_id / "trl" / "saved")
        got_state = _state(tmp_path / case_id / "fastdpo" / "saved")
        assert set(got_state) == set(want_state), f"{engine} {case_id}: saved keys differ"
        for name, w in want_state.items():
            g = got_state[name]
            assert g.shape == w.shape and w.numel() > 0, f"{engine} {case_id} {name}: {g.shape} vs {w.shape}"
            err, scale = (g.double() - w.double()).abs().max().item(), w.double().abs().max().item()
            WORST["weights"] = max(WORST["weights"], err / scale)
            assert err <= WEIGHT_RTOL * scale, (f"{engine} {case_id} saved {name}: {err:.2e} > {WEIGHT_RTOL} * "
                                                f"{scale:.3g}")
    print(f"\n{engine}: worst relative differences {WORST}")


if __name__ == "__main__":
    worker(sys.argv[1])
