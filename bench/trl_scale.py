"""FastDPOTrainer against TRL's DPOTrainer under DeepSpeed ZeRO-3 and FSDP2: 2 processes on the CPU (gloo).

    python bench/trl_scale.py [--engines zero3,fsdp2] [--data long] [--steps 4] [--warmup 1] [--out FILE]

The head-dominated case of bench/trainer_compare.py (its Llama of D 256 x 4 layers x V 32000, its data and
tokenizer), fp32, precomputed reference log-probs, 1 pair per process per step (2 pairs per step, as the
single-process table), the same pairs in the same order for both trainers. Each (engine, trainer) is its own
``torchrun --nproc-per-node 2`` launch; every rank reports its median step time (on_step_begin -> on_step_end over
the timed steps), its peak RSS (ru_maxrss: load, reference pass and training) and its step peak (growth of the
resident high-water mark over the timed steps, as trainer_compare.py measures it). ZeRO-3 runs DeepSpeed's defaults
(parameters under 1e5 elements stay whole on every rank); FSDP2 shards each decoder layer and the rest at the root,
resharding after forward. accelerate 1.16 sets up DeepSpeed and FSDP only where torch sees an accelerator, so the
child sets up accelerate's state as a GPU launch would, over gloo (as tests/test_trl_scale.py does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import peak_rss_kb, reset_peak_rss, rss_kb, version  # noqa: E402
from trainer_compare import CHILD_ENV, D, LAYERS, SEED, V, build_model, sampled_lengths, write_pairs  # noqa: E402

ENGINES = ("zero3", "fsdp2")
METHODS = {"trl": "TRL DPOTrainer", "trl_fastdpo": "FastDPOTrainer"}
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": False},
         "fp16": {"enabled": False}, "zero_optimization": {"stage": 3}}
FSDP2 = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})


def engine_state(engine: str) -> None:
    """accelerate's state as a GPU launch sets it up (DeepSpeed; FSDP: a multi-device group), over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    if engine == "zero3":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    if engine == "fsdp2":
        state.distributed_type = DistributedType.MULTI_GPU      # what AcceleratorState turns into FSDP


def child(engine: str, method: str, spec: dict) -> None:
    import torch
    torch.set_num_threads(1)                                    # 2 processes on 2 cores
    engine_state(engine)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    if method == "trl_fastdpo":
        from fastdpo.integrations.trl import FastDPOTrainer as DPOTrainer     # noqa: F811 (the one-line swap)
    # from the file: the precomputed reference log-probs go to the dataset's cache file, which every rank must find
    # (an in-memory dataset's cache is a per-process temporary folder); the file holds training rows only
    data = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["out"] + "-hf-cache")
    data = data.remove_columns("split")
    times, base, peak = [], [None], [None]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == spec["warmup"]:
                base[0] = rss_kb() if reset_peak_rss() else None
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)
            if state.global_step == spec["steps"]:
                peak[0] = peak_rss_kb()

    engine_args = dict(deepspeed=ZERO3) if engine == "zero3" else FSDP2
    args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=1, max_length=spec["max_length"],
                     precompute_ref_log_probs=True, learning_rate=1e-6, lr_scheduler_type="linear", warmup_steps=0,
                     max_steps=spec["steps"], logging_steps=1, report_to=[], bf16=False, fp16=False,
                     gradient_checkpointing=False, save_strategy="no", eval_strategy="no", ddp_backend="gloo",
                     train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
                     accelerator_config={"use_configured_state": True}, **engine_args)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]), callbacks=[StepTimer()])
    assert trainer.is_deepspeed_enabled == (engine == "zero3") and trainer.is_fsdp_enabled == (engine == "fsdp2")
    trainer.train()
    timed = times[spec["warmup"]:]
    result = dict(rank=int(os.environ["RANK"]), step_s=statistics.median(timed), times=times,
                  losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                  peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  step_peak_gb=None if base[0] is None or peak[0] is None else (peak[0] - base[0]) / 2**20)
    with open(f"{spec['out']}-{engine}-{method}-{result['rank']}.json", "w") as f:    # ranks share stdout
        json.dump(result, f)


def launch(engine: str, method: str, spec: dict, timeout: float) -> list:
    env = {**os.environ, **CHILD_ENV, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29400 + os.getpid() % 500), os.path.abspath(__file__), "--child", engine, method, json.dumps(spec)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{engine} {method}: exit {run.returncode}\n{run.stderr[-3000:]}")
    results = []
    for rank in range(2):
        with open(f"{spec['out']}-{engine}-{method}-{rank}.json") as f:
            results.append(json.load(f))
    print(f"  {engine} {method}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return sorted(results, key=lambda r: r["rank"])


def table(results: dict, spec: dict) -> str:
    lines = [f"device: 2 CPU processes x 1 torch thread, fp32, gloo | torch {version('torch')}, transformers "
             f"{version('transformers')}, trl {version('trl')}, deepspeed {version('deepspeed')}, accelerate "
             f"{version('accelerate')} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | load "
             f"average {os.getloadavg()[0]:.2f}", "",
             "| engine | trainer | step time (s), rank 0 / 1 | × TRL | peak RSS per process (GB), rank 0 / 1 | × TRL "
             "| step peak (GB), rank 0 / 1 | loss step 1 → last |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for engine in results:
        trl = results[engine]["trl"]
        for method, ranks in results[engine].items():
            step = max(r["step_s"] for r in ranks)
            peak = max(r["peak_gb"] for r in ranks)
            sp = " / ".join("n/a" if r["step_peak_gb"] is None else f"{r['step_peak_gb']:.3f}" for r in ranks)
            st = " / ".join(f"{r['step_s']:.3f}" for r in ranks)
            pk = " / ".join(f"{r['peak_gb']:.2f}" for r in ranks)
            lines.append(f"| {engine} | {METHODS[method]} | {st} | {step / max(r['step_s'] for r in trl):.2f}× | "
                         f"{pk} | {peak / max(r['peak_gb'] for r in trl):.2f}× | {sp} | "
                         f"{ranks[0]['losses'][0]:.4f} → {ranks[0]['losses'][-1]:.4f} |")
    lines.append("")
    lines.append(f"Model: Llama D {D} x {LAYERS} layers x V {V}, random init; {spec['data_kind']} data of "
                 "bench/trainer_compare.py; 1 pair per process per step; precomputed reference log-probs; "
                 f"{spec['steps'] - spec['warmup']} timed steps after {spec['warmup']} warm-up (median per rank); "
                 "× TRL: the slower rank's step time and the larger process's peak RSS, over TRL's.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--data", default="long", choices=("long", "short"))
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps in all (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "pairs.jsonl")
        build_model(model)
        write_pairs(data, sampled_lengths(a.data, 2 * a.steps, SEED), [])
        spec = dict(model=model, data=data, steps=a.steps, warmup=a.warmup, max_length=4096, data_kind=a.data,
                    out=os.path.join(tmp, "run"))
        results = {}
        for engine in a.engines.split(","):
            for method in METHODS:
                results.setdefault(engine, {})[method] = launch(engine, method, spec, a.timeout)
    text = table(results, spec)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        main()
