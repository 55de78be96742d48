"""FastDPOTrainer with its pair layout on and off, and TRL's DPOTrainer, in one process, step by step in alternation.

    python bench/trl_layout_ab.py [--data long|short] [--steps 12] [--warmup 2] [--threads 0] [--out FILE]
                                  [--model D,LAYERS,FFN,HEADS] [--no-trl]

``bench/trainer_compare.py`` runs each trainer in its own process (so that its memory is its own); on a shared
machine the load then differs from one trainer's run to the next. Here the three trainers live in one process, each
with its own copy of the same model and its own optimizer, and every step runs through each of them in turn (the
order reversed every other step), so a change of the machine's speed hits them alike; printed: each trainer's
median step time and the median (and quartiles) of its per-step time ratio to the others. No memory figures.

Everything else is bench/trainer_compare.py's: its Llama (D 256 x 4 layers, V 32000, random init, fp32, sdpa), its
word-level tokenizer, its data (``long``: prompts of 192-384 tokens; ``short``: 16-48; replies of 32-128 + EOS),
2 pairs per step in fastdpo's seeded order, precomputed reference log-probs, AdamW at lr 1e-6. A step is what TRL's
loop does per optimizer step: ``Trainer.training_step`` (forward, backward), clipping at 1.0, the optimizer and
scheduler steps, ``zero_grad``; the batch is collated before the clock starts, as in TRL's loop.

``--model`` changes the Llama's shape (the vocabulary stays 32000): bench/trainer_compare.py's model is dominated by
its head (72% of the weights a position multiplies), whose cost per scored token the layout cannot change; a wider,
deeper backbone shows the layout's share where the backbone dominates, as in real models. ``--no-trl`` leaves TRL's
DPOTrainer out (on a larger model it alone takes most of the run).

This process's allocator is glibc's default. bench/trainer_compare.py's children set ``MALLOC_MMAP_THRESHOLD_`` to
1 MiB (so that a freed tensor leaves the resident set and memory can be read from it), which makes every larger
allocation a fresh mmap with page faults: that slows the batches with larger tensors (the padded ones) more, and
its step times overstate the layout's gain (long prompts, 1 thread: 0.56x here with that setting, 0.68x without).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

from compare import emit, version
import trainer_compare
from trainer_compare import PAIRS_PER_STEP, SEED, build_model, sampled_lengths, trl_config, trl_dataset, write_pairs

LABEL = {"layout": "FastDPOTrainer (pair layout)", "padded": "FastDPOTrainer, pair_layout=False",
         "trl": "TRL DPOTrainer"}


def trainers(model_dir: str, data_path: str, steps: int, out: str, names: tuple) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer

    data = trl_dataset(data_path, PAIRS_PER_STEP)
    made = {}
    for name, cls, extra in (("layout", FastDPOTrainer, {}), ("padded", FastDPOTrainer, dict(pair_layout=False)),
                             ("trl", DPOTrainer, {})):
        if name not in names:
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        args = trl_config(os.path.join(out, name), PAIRS_PER_STEP, None, steps)
        trainer = cls(model=model, args=args, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), **extra)
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        trainer.current_gradient_accumulation_steps = 1     # what Trainer's loop sets before each step
        made[name] = (trainer, iter(trainer.get_train_dataloader()))
    if not made["layout"][0].padding_free:
        sys.exit("FastDPOTrainer did not take its pair layout here: nothing to compare")
    return made


def step(trainer, inputs) -> float:
    import torch
    trainer.model.train()
    start = time.perf_counter()
    trainer.training_step(trainer.model, inputs)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def quartiles(xs: list) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"median {q[1]:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="long", choices=("long", "short"))
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="append the markdown to this file")
    p.add_argument("--model", help="the Llama's D,LAYERS,FFN,HEADS (default: bench/trainer_compare.py's 256,4,688,4)")
    p.add_argument("--no-trl", action="store_true", help="leave TRL's DPOTrainer out")
    args = p.parse_args()
    if args.model:
        trainer_compare.D, trainer_compare.LAYERS, trainer_compare.FFN, trainer_compare.HEADS = (
            int(x) for x in args.model.split(","))
    names = ("layout", "padded") if args.no_trl else ("layout", "padded", "trl")
    os.environ.update(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        n_params = build_model(model_dir)
        data_path = os.path.join(tmp, "pairs.jsonl")
        write_pairs(data_path, sampled_lengths(args.data, steps * PAIRS_PER_STEP, SEED), [])
        made = trainers(model_dir, data_path, steps, tmp, names)
        times = {name: [] for name in made}
        loads = []
        for k in range(steps):
            names = list(made) if k % 2 == 0 else list(made)[::-1]
            batches = {name: next(made[name][1]) for name in names}
            for name in names:
                t = step(made[name][0], batches[name])
                if k >= args.warmup:
                    times[name].append(t)
            loads.append(os.getloadavg()[0])
            print(f"  step {k + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names if times[n]),
                  file=sys.stderr, flush=True)
    ratio = lambda a, b: [x / y for x, y in zip(times[a], times[b])]     # noqa: E731
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shape = f"D {trainer_compare.D} x {trainer_compare.LAYERS} layers, FFN {trainer_compare.FFN}, " \
            f"{trainer_compare.HEADS} heads, V {trainer_compare.V}"
    lines = [f"\n### `python bench/trl_layout_ab.py {' '.join(sys.argv[1:])}`",
             "", f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
             f"{version('transformers')}, trl {version('trl')} | {now} | 1-min load average "
             f"{min(loads):.1f}-{max(loads):.1f} | Llama {n_params / 1e6:.1f} M parameters ({shape}), fp32", "", "```"]
    for name in made:
        lines.append(f"{LABEL[name]}: median step {statistics.median(times[name]):.3f} s")
    for a, b in (("layout", "padded"), ("layout", "trl"), ("padded", "trl")):
        if b in times:
            lines.append(f"{a} / {b}, per step: {quartiles(ratio(a, b))}")
    lines.append("```")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
