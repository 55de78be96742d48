"""Whole trainers side by side: `fastdpo train` in its layouts against TRL's DPOTrainer, same model, data, batches.

    python bench/trainer_compare.py [--data long,short] [--steps 8] [--warmup 2] [--repeats 1] [--methods M,...]
                                    [--out FILE]
    python bench/trainer_compare.py --memory-vs-context [--contexts 1k,2k,4k,8k,16k,32k] [--mem-steps 2]
                                    [--timeout 600] [--json FILE]     # then: python bench/plots.py
    python bench/trainer_compare.py --one-long-pair [--mem-steps 2] [--timeout 900]

Methods (``--methods``): ``fastdpo`` (the `fastdpo train` defaults for the model: --share-prompt --packing
resolved on, and on this CPU --span-attention), ``fastdpo_cache`` (the prompt through the key/value cache:
share_prompt, no packing, prompt_cache), ``fastdpo_plain`` (no sharing, no packing: two padded rows per pair),
``trl`` (TRL's DPOTrainer with gradient checkpointing off and fp32, as fastdpo runs here), ``trl_fastdpo``
(``fastdpo.integrations.trl.FastDPOTrainer``: TRL's DPOTrainer, same config, one class swapped; its pair layout
on, as by default) and, when asked for, ``trl_fastdpo_padded`` (FastDPOTrainer with ``pair_layout=False``: TRL's
padded batches), ``fastdpo_mask`` (the shared and packed layout with its dense custom attention mask at every length:
--no-span-attention --no-prompt-cache) and ``trl_gc`` (TRL's own default, gradient checkpointing on). All get the
same randomly initialized Llama-architecture model (built from a config,
no downloads), the same tokenizer (one whitespace word = one token, so both trainers see the same ids), the same
pairs in the same micro-batches in the same order (fastdpo's seeded order; TRL reads the data in it with a
sequential sampler), precomputed reference log-probs, AdamW at lr 1e-6 with a linear schedule and no warm-up,
clipping at 1.0, no eval during training, nothing truncated.

Each method runs in a fresh process (``--child``) so that its memory is its own: "peak RSS" is ru_maxrss (model
load, reference pass and training together); "step peak" is the growth of the resident high-water mark over the
timed steps above the resident set at their start (the kernel's VmHWM, reset through /proc/self/clear_refs; every
allocation above 1 MiB its own mmap, so freed tensors leave the resident set at once): what training adds on top
of the model, its optimizer state and the cached reference log-probs. That setting costs time (every tensor above
1 MiB is a fresh mmap with page faults), more for the layouts with larger tensors: it overstates a smaller layout's
step-time gain (FastDPOTrainer, long prompts, 1 thread: 0.56x its padded batches with it, 0.68x without, in one
process: bench/trl_layout_ab.py), so read the step times here with the memory, and the time ratios from the
same-process A/Bs (bench/layout_ab.py, bench/trl_layout_ab.py); the child runs under an address-space limit (--rlimit-gb) and
a timeout, and a method that fails shows as ``n/a (reason)``. A step is timed as each trainer sees it: fastdpo's
``step_time_s`` (building the layout, forward, backward, optimizer step) and, for TRL, a callback's
on_step_begin -> on_step_end (forward, backward, optimizer step; its collation happens before on_step_begin).
Tokens computed are the positions the backbone runs, padding included (fastdpo's ``tokens_computed``, TRL's
``input_ids.numel()``); "unique" tokens are what a pair holds (prompt once + both replies with their EOS).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from compare import emit, peak_rss_kb, reset_peak_rss, rss_kb, version

RESULT_TAG = "@@result "
THREADS = 0                                 # --threads
METHODS = ("fastdpo", "fastdpo_cache", "fastdpo_plain", "trl", "trl_fastdpo", "fastdpo_mask", "trl_gc",
           "trl_fastdpo_padded")
DEFAULT_METHODS = METHODS[:5]
LAYOUTS = {"fastdpo": {}, "fastdpo_cache": dict(share_prompt=True, packing=False, prompt_cache=True),
           "fastdpo_plain": dict(share_prompt=False, packing=False),
           "fastdpo_mask": dict(share_prompt=True, packing=True, prompt_cache=False, span_attention=False)}
LABEL = {"fastdpo": "fastdpo default", "fastdpo_cache": "fastdpo prompt-cache", "fastdpo_plain": "fastdpo plain",
         "trl": "TRL DPOTrainer", "trl_fastdpo": "FastDPOTrainer (TRL + fastdpo)", "fastdpo_mask": "fastdpo shared+packed dense mask", "trl_gc": "TRL + grad. ckpt",
         "trl_fastdpo_padded": "FastDPOTrainer, pair_layout=False"}
# the model: Llama architecture, hidden 256 x 4 layers, vocabulary 32000
D, LAYERS, FFN, HEADS, V, MAX_POS = 256, 4, 688, 4, 32000, 65536
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = V - 9                               # w0..w31990 + 4 special tokens fit in the 32000 rows
PAIRS_PER_STEP, LR, SEED = 2, 1e-6, 0
# (prompt words, reply words) ranges per data kind; each reply also gets EOS
DATA = {"long": ((192, 384), (32, 128)), "short": ((16, 48), (32, 128))}
# as bench/compare.py: every allocation above 1 MiB its own mmap, so a freed tensor leaves the resident set at once
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------ model and data

def matmul_params() -> int:
    """Weights that take part in a matrix product per position: q, k, v, o, the MLP and the LM head."""
    return LAYERS * (4 * D * D + 3 * D * FFN) + D * V


def build_model(path: str) -> int:
    """The seeded model and its word-level tokenizer, saved to ``path``; returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)} | {f"w{i}": i + len(SPECIAL) for i in range(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)               # split out first: "w5</s>" -> w5, </s>
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_POS,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def words(rng, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def write_pairs(path: str, train: list, eval_: list) -> None:
    """(prompt words, chosen words, rejected words) counts -> TRL's explicit-prompt JSONL (replies start with a
    space), the held-out rows marked ``split: eval`` (fastdpo evaluates before and after; TRL never sees them)."""
    rng = random.Random(SEED)
    with open(path, "w") as f:
        for split, rows in (("train", train), ("eval", eval_)):
            for p, c, r in rows:
                f.write(json.dumps({"prompt": words(rng, p), "chosen": " " + words(rng, c),
                                    "rejected": " " + words(rng, r), "split": split}) + "\n")


def sampled_lengths(kind: str, n: int, seed: int) -> list:
    rng = random.Random(seed)
    (p0, p1), (r0, r1) = DATA[kind]
    return [(rng.randint(p0, p1), rng.randint(r0, r1), rng.randint(r0, r1)) for _ in range(n)]


def step_batches(n_train: int, steps: int, batch: int) -> list:
    """fastdpo's micro-batches (train-row indices) for steps 1..steps: the order both trainers read."""
    from fastdpo.train.trainer import batch_indices
    return [batch_indices(k, n_train, batch, SEED) for k in range(steps)]


# ------------------------------------------------------------------------------------------------ the children

class StepMemory:
    """The resident set when the first timed step begins, and its high-water mark when the last one ends."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.base_kb, self.peak_kb, self.clean = warmup, steps, None, None, False

    def step_begins(self, step: int) -> None:      # step: the optimizer steps done so far
        if step == self.warmup:
            self.base_kb, self.clean = rss_kb(), reset_peak_rss()

    def step_ends(self, step: int) -> None:
        if step == self.steps:
            self.peak_kb = peak_rss_kb()

    def result(self) -> dict:
        ok = self.base_kb is not None and self.peak_kb is not None and self.clean
        return dict(step_peak_gb=(self.peak_kb - self.base_kb) / 2**20 if ok else None)


def child_fastdpo(method: str, spec: dict) -> dict:
    from fastdpo.train import trainer
    from fastdpo.train.config import build
    from fastdpo.train.reporting import Reporter

    out = spec["out"]
    options = dict(model=spec["model"], dataset=spec["data"], attn_implementation="sdpa", steps=spec["steps"],
                   batch_size=spec["batch"], lr=LR, warmup_steps=0, schedule="linear", max_length=spec["max_length"],
                   eval_every=0, save_every=0, output_dir=out, cache_dir=os.path.join(out, "cache"), progress=False,
                   seed=SEED, **LAYOUTS[method])
    cpu, memory, report = [], StepMemory(spec["warmup"], spec["steps"]), Reporter.train

    def reported(self, record, last):              # after each optimizer step (and before the first one, via eval)
        cpu.append(time.process_time())
        memory.step_ends(record["step"])
        memory.step_begins(record["step"])
        return report(self, record, last)

    def evaluated(self, record, evaluate=Reporter.eval):
        if record["step"] == 0:                    # the evaluation before training: the first step begins after it
            cpu.append(time.process_time())
            memory.step_begins(0)
        return evaluate(self, record)
    Reporter.train, Reporter.eval = reported, evaluated
    trainer.train(build(options, set(options)))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "step_time_s" in r]
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    layout = "+".join(k for k in ("share_prompt", "packing", "prompt_cache", "span_attention") if cfg.get(k)) or "plain"
    if cfg["share_prompt"] and cfg.get("prompt_cache", False) is None and not cfg.get("span_attention"):
        from fastdpo.layout import PROMPT_CACHE_FROM
        layout += f", prompt_cache auto (≥ {PROMPT_CACHE_FROM})"
    return dict(times=[r["step_time_s"] for r in steps], cpu=[b - a for a, b in zip(cpu, cpu[1:len(steps) + 1])],
                tokens=[r["tokens_computed"] for r in steps], losses=[r["loss"] for r in steps], layout=layout,
                **memory.result())


def trl_dataset(path: str, batch: int):
    """The train rows of ``path`` as TRL reads them: fastdpo's first epoch, in order (every mode here trains within
    one epoch, or on a single pair), for a sequential sampler."""
    from datasets import Dataset
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    order = [i for idx in step_batches(len(rows), -(-len(rows) // batch), batch) for i in idx]
    return Dataset.from_list([{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in order])


def trl_config(out: str, batch: int, max_length, steps: int, gradient_checkpointing: bool = False):
    """The DPOConfig every TRL method runs: fastdpo's optimizer settings, fp32 on the CPU, precomputed reference
    log-probs, no eval or saving, the data read in order."""
    from trl import DPOConfig
    return DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_length=max_length,
                     precompute_ref_log_probs=True, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                     max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=gradient_checkpointing, save_strategy="no", eval_strategy="no",
                     train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True, dataloader_num_workers=0)


def child_trl(method: str, spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    extra, positions = {}, lambda inputs: inputs["input_ids"].numel()
    if method.startswith("trl_fastdpo"):
        from fastdpo.integrations import _trl_layout
        from fastdpo.integrations.trl import FastDPOTrainer as DPOTrainer     # the one-line swap
        extra = dict(pair_layout=False) if method == "trl_fastdpo_padded" else {}
        positions = _trl_layout.positions
    data = trl_dataset(spec["data"], spec["batch"])
    times, cpu, tokens, memory = [], [], [], StepMemory(spec["warmup"], spec["steps"])

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            memory.step_begins(state.global_step)
            self.started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started[0])
            cpu.append(time.process_time() - self.started[1])
            memory.step_ends(state.global_step)

    class Counted(DPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                tokens.append(positions(inputs))
            return super().compute_loss(model, inputs, *args, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = trl_config(spec["out"], spec["batch"], spec["max_length"], spec["steps"],
                      gradient_checkpointing=method == "trl_gc")
    trainer = Counted(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(
        spec["model"]), callbacks=[StepTimer()], **extra)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(times=times, cpu=cpu, tokens=tokens, losses=losses, **memory.result(),
                layout="shared prompt, packed" if method == "trl_fastdpo" and trainer.padding_free else
                "padded rows" + (", grad. ckpt" if method == "trl_gc" else ""))


def child(method: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        import torch
        torch.set_num_threads(spec["threads"])
    limit = int(spec["rlimit_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    load = os.getloadavg()[0]
    try:
        result = (child_trl if method.startswith("trl") else child_fastdpo)(method, spec)
        result["ok"] = True
    except BaseException as e:                         # MemoryError, the allocator's RuntimeError, anything
        first = (str(e).strip().splitlines() or [""])[0]
        result = dict(ok=False, reason=f"{type(e).__name__}: {first[:160]}")
    result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load"] = [load, os.getloadavg()[0]]       # the machine's 1-min load average at start and end
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(method: str, spec: dict, timeout: float) -> dict:
    """One method in a fresh process; failures come back as {"ok": False, "reason": ...}."""
    os.makedirs(spec["out"], exist_ok=True)
    started = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, env={**os.environ, **CHILD_ENV})
    except subprocess.TimeoutExpired:
        return dict(ok=False, reason=f"timeout after {timeout:.0f} s")
    wall = time.perf_counter() - started
    for line in run.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "wall_s": wall}
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(ok=False, reason=f"exit {run.returncode}: {tail[:160]}")


# ------------------------------------------------------------------------------------------------ reporting

def header() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import fastdpo
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastdpo.__file__)))     # the fastdpo measured
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()  # noqa
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if git("status", "--porcelain",
                                                                                    "--untracked-files=no") else "")
    import torch
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = THREADS or torch.get_num_threads()
    return (f"device: {cpu}, {os.cpu_count()} cores, torch {threads} threads, fp32 | torch "
            f"{version('torch')}, transformers {version('transformers')}, trl {version('trl')}, fastdpo "
            f"{version('fastdpo')} | commit {commit} | {date} | load average {os.getloadavg()[0]:.2f}")


def gemm_gflops() -> float:
    """The machine's fp32 matrix-product rate, measured here (median of 5 products of 2048 x 2048)."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / statistics.median(times) / 1e9


def gb(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def ratio(x, base) -> str:
    return f"{x / base:.2f}×" if x is not None and base else "—"


def summarize(r: dict, warmup: int) -> dict:
    """Median step time and mean tokens over the steps after the warm-up."""
    if not r.get("ok"):
        return r
    timed = slice(warmup, None)
    return {**r, "time": statistics.median(r["times"][timed]), "cpu_s": statistics.median(r["cpu"][timed]),
            "tok": statistics.mean(r["tokens"][timed]), "n": len(r["times"][timed])}


# ------------------------------------------------------------------------------------------------ the three modes

def compare(args, tmp: str, model_dir: str, n_params: int) -> None:
    gemm = gemm_gflops()
    total = args.warmup + args.steps
    n_train = total * PAIRS_PER_STEP                  # every pair once: warm-up and timed steps see different pairs
    for kind in args.data.split(","):
        lengths = sampled_lengths(kind, n_train + 1, seed=len(kind))
        path = os.path.join(tmp, f"{kind}.jsonl")
        write_pairs(path, lengths[:n_train], lengths[n_train:])
        max_length = max(p + max(c, r) + 1 for p, c, r in lengths) + 8
        batches = step_batches(n_train, total, PAIRS_PER_STEP)[args.warmup:]
        unique = statistics.mean(sum(lengths[i][0] + lengths[i][1] + lengths[i][2] + 2 for i in b) for b in batches)
        runs = {m: [] for m in args.methods}
        for rep in range(args.repeats):             # round-robin, so that a busy spell of the machine hits all
            for m in args.methods:
                spec = dict(model=model_dir, data=path, out=os.path.join(tmp, f"{kind}-{m}-{rep}"), steps=total,
                            warmup=args.warmup, threads=args.threads,
                            batch=PAIRS_PER_STEP, max_length=max_length, rlimit_gb=args.rlimit_gb)
                runs[m].append(summarize(run_child(m, spec, args.timeout), args.warmup))
                print(f"  {kind} {m} run {rep + 1}: {json.dumps(runs[m][-1])}", file=sys.stderr, flush=True)
        # each method's least disturbed run (lowest median step time); a method is n/a if every run failed
        results = {m: min((r for r in rs if r.get("ok")), key=lambda r: r["time"], default=rs[-1])
                   for m, rs in runs.items()}
        loads = [x for rs in runs.values() for r in rs for x in r.get("load", ())]
        plain, trl = results.get("fastdpo_plain", {}), results.get("trl", {})
        (p0, p1), (r0, r1) = DATA[kind]
        lines = [f"\n### {kind}-prompt data: prompts {p0}–{p1} tokens, replies {r0}–{r1} (+EOS), "
                 f"{PAIRS_PER_STEP} pairs/step, {args.steps} timed steps after {args.warmup} warm-up",
                 "", header(),
                 "", "| method | layout | step time (s) | × plain | × TRL | CPU s / step | tokens computed / step | "
                 "× unique | step peak (GB) | × plain | × TRL | peak RSS (GB) | × plain | × TRL | useful GFLOP/s (% of mm) | "
                 "loss step 1 → last |", "|---|---|" + "---:|" * 13 + "---|"]
        for m, r in results.items():
            if not r.get("ok"):
                lines.append(f"| {LABEL[m]} | n/a ({r['reason']}) |" + " |" * 14)
                continue
            useful = 6 * matmul_params() * unique / r["time"] / 1e9
            lines.append(
                f"| {LABEL[m]} | {r['layout']} | {r['time']:.3f} | {ratio(r['time'], plain.get('time'))} | "
                f"{ratio(r['time'], trl.get('time'))} | {r['cpu_s']:.2f} | {r['tok']:.0f} | {ratio(r['tok'], unique)} | "
                f"{gb(r['step_peak_gb'])} | {ratio(r['step_peak_gb'], plain.get('step_peak_gb'))} | "
                f"{ratio(r['step_peak_gb'], trl.get('step_peak_gb'))} | {r['peak_gb']:.2f} | {ratio(r['peak_gb'], plain.get('peak_gb'))} | "
                f"{ratio(r['peak_gb'], trl.get('peak_gb'))} | {useful:.1f} ({100 * useful / gemm:.0f}%) | "
                f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
        lines += ["", f"Model: Llama architecture, {n_params / 1e6:.1f} M parameters (D {D}, {LAYERS} layers, FFN "
                  f"{FFN}, {HEADS} heads, V {V}), random init, fp32, sdpa attention. Step time: median over the timed "
                  f"steps (wall; CPU s: the process's user + system seconds, ≈ 2 × wall on 2 idle cores); peak RSS: ru_maxrss of the method's own process (load, reference pass, training). Unique "
                  f"tokens: {unique:.0f} per step (each pair's prompt once + both replies). Useful GFLOP/s: "
                  f"6 · {matmul_params() / 1e6:.1f} M matmul weights · unique tokens / step time (attention and "
                  f"recomputation not counted), against torch.mm's {gemm:.0f} GFLOP/s measured in this run. Same "
                  f"pairs, batches and order in every method; loss at step 1 is ln 2 (policy = reference). Each "
                  f"method ran {args.repeats}× (round-robin, each run its own process); shown: its run with the "
                  f"lowest median step time. The machine is shared: 1-min load average "
                  f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} over the runs (2 = both cores busy)."]
        emit("\n".join(lines), args.out)


def one_pair_spec(tmp: str, model_dir: str, name: str, prompt: int, reply: int, steps: int, rlimit_gb: float):
    """One training pair of ``prompt`` tokens and two replies of ``reply`` tokens each (EOS included), and a
    small held-out pair for fastdpo's evaluation."""
    path = os.path.join(tmp, f"{name}.jsonl")
    write_pairs(path, [(prompt, reply - 1, reply - 1)], [(16, 8, 8)])
    return dict(model=model_dir, data=path, steps=steps, warmup=0, batch=1, max_length=prompt + reply + 8,
                rlimit_gb=rlimit_gb)


def memory_vs_context(args, tmp: str, model_dir: str, n_params: int) -> None:
    rows = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            for r in map(json.loads, f):
                rows[(r["context"], r["method"])] = r
    for ctx in [parse_k(c) for c in args.contexts.split(",")]:
        reply = ctx // 8                     # prompt 3/4 of the pair's tokens, each reply 1/8 (EOS included)
        for m in args.methods:
            spec = {**one_pair_spec(tmp, model_dir, f"ctx{ctx}", ctx - 2 * reply, reply, args.mem_steps,
                                    args.rlimit_gb), "out": os.path.join(tmp, f"ctx{ctx}-{m}")}
            r = run_child(m, spec, args.timeout)
            row = dict(context=ctx, method=m, steps=args.mem_steps, ok=r["ok"], peak_gb=r.get("peak_gb"),
                       reason=r.get("reason"),
                       step_s=r["times"][-1] if r.get("ok") else None, wall_s=r.get("wall_s"))
            print(f"  {ctx} {m}: {json.dumps(row)}", file=sys.stderr, flush=True)
            rows[(ctx, m)] = row
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    contexts = sorted({c for c, _ in rows})
    methods = [m for m in METHODS if any(k[1] == m for k in rows)]
    cell = lambda r: "—" if r is None else (f"{r['peak_gb']:.2f} GB, {r['step_s']:.1f} s" if r["ok"]  # noqa
                                              else f"n/a ({r['reason']})")
    lines = ["\n### Peak RSS (and the last optimizer step's time) against context per pair: one pair, prompt 3/4 "
             "of its tokens, each reply 1/8", "", header(), "",
             "| tokens per pair (prompt + 2 × reply) | steps | " + " | ".join(LABEL[m] for m in methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for c in contexts:
        steps = sorted({str(r.get("steps", "?")) for (cc, _), r in rows.items() if cc == c})
        lines.append(f"| {c} ({c * 3 // 4} + 2 × {c // 8}) | {'/'.join(steps)} | "
                     + " | ".join(cell(rows.get((c, m))) for m in methods) + " |")
    lines += ["", f"Model {n_params / 1e6:.1f} M parameters (Llama, D {D} × {LAYERS} layers, V {V}), fp32; each "
              f"method in its own process under a {args.rlimit_gb:g} GB address-space limit and a {args.timeout:.0f} s "
              "timeout; peak RSS = ru_maxrss (model load, reference pass, training and, for fastdpo, its evaluation "
              "of a 16 + 2 × 9-token held-out pair). Plot: `python bench/plots.py` (bench/memory_vs_context.png)."]
    emit("\n".join(lines), args.out)


def one_long_pair(args, tmp: str, model_dir: str, n_params: int) -> None:
    prompt, reply = 16384, 1024
    results = {}
    for m in args.methods:
        spec = {**one_pair_spec(tmp, model_dir, "long-pair", prompt, reply, args.mem_steps, args.rlimit_gb),
                "out": os.path.join(tmp, f"long-pair-{m}")}
        results[m] = run_child(m, spec, args.timeout)
        print(f"  long pair {m}: {json.dumps(results[m])}", file=sys.stderr, flush=True)
    plain, trl = results.get("fastdpo_plain", {}), results.get("trl", {})
    lines = [f"\n### One pair: a {prompt}-token prompt and two {reply}-token replies (EOS included), "
             f"{args.mem_steps} optimizer step{'s' if args.mem_steps > 1 else ''}", "", header(), "",
             "| method | layout | peak RSS (GB) | × plain | × TRL | training peak (GB) | × plain | × TRL | last step (s) "
             "| tokens computed / step | loss step 1 → last |", "|---|---|" + "---:|" * 8 + "---|"]
    for m, r in results.items():
        if not r.get("ok"):
            peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else "—"
            lines.append(f"| {LABEL[m]} | n/a ({r['reason']}) | {peak} |" + " |" * 8)
            continue
        lines.append(f"| {LABEL[m]} | {r['layout']} | {r['peak_gb']:.2f} | {ratio(r['peak_gb'], plain.get('peak_gb'))}"
                     f" | {ratio(r['peak_gb'], trl.get('peak_gb'))} | {gb(r['step_peak_gb'])} | "
                     f"{ratio(r['step_peak_gb'], plain.get('step_peak_gb'))} | "
                     f"{ratio(r['step_peak_gb'], trl.get('step_peak_gb'))} | {r['times'][-1]:.1f} | {r['tokens'][-1]:.0f} | "
                     f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
    lines += ["", f"Model {n_params / 1e6:.1f} M parameters (Llama, D {D} × {LAYERS} layers, V {V}), fp32; each method "
              f"in its own process ({args.rlimit_gb:g} GB address-space limit, {args.timeout:.0f} s timeout); peak RSS = "
              "ru_maxrss of the whole run (load, reference pass, training); training peak = the resident high-water mark "
              "over the optimizer steps above the resident set before the first (the model and the cached reference "
              "log-probs exist then; the optimizer state is created in step 1, so it counts)."]
    emit("\n".join(lines), args.out)


def parse_k(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="long,short", help="data kinds: long, short")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (round-robin); the fastest is shown")
    p.add_argument("--threads", type=int, default=0, help="torch threads per method (0: torch's default); on "
                                                          "shared cores one thread varies far less between runs")
    p.add_argument("--out", help="append the markdown to this file")
    p.add_argument("--memory-vs-context", action="store_true", help="peak memory of one pair at growing contexts")
    p.add_argument("--contexts", default="1k,2k,4k,8k,16k,32k", help="tokens per pair for --memory-vs-context")
    p.add_argument("--one-long-pair", action="store_true", help="one pair: 16384-token prompt, two 1024-token replies")
    p.add_argument("--mem-steps", type=int, default=2, help="optimizer steps of --memory-vs-context/--one-long-pair")
    p.add_argument("--timeout", type=float, default=600, help="seconds per method (one process)")
    p.add_argument("--rlimit-gb", type=float, default=20, help="address-space limit of each method's process")
    p.add_argument("--json", help="--memory-vs-context: append raw rows here and plot every row the file holds")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    global THREADS
    THREADS = args.threads
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="trainer-compare-") as tmp:
        model_dir = os.path.join(tmp, "model")
        n_params = build_model(model_dir)
        print(f"model: {n_params / 1e6:.1f} M parameters, {math.ceil(n_params * 4 / 2**20)} MB fp32",
              file=sys.stderr)
        if args.memory_vs_context:
            memory_vs_context(args, tmp, model_dir, n_params)
        elif args.one_long_pair:
            one_long_pair(args, tmp, model_dir, n_params)
        else:
            compare(args, tmp, model_dir, n_params)


if __name__ == "__main__":
    main()
