"""A thin DPO trainer: load -> cache reference log-probs -> loop (forward, fused loss, step, log) -> save.

The reference is the initial policy: its log-probs are computed once (``ref_cache``), cached on disk and
reused, so training holds one model. The loss is ``fastdpo.loss.linear_dpo_loss`` on the backbone's hidden
states and the output-embedding weight, inside one forward (``ref_cache.Policy``) that FSDP can shard.
"""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import prefdata, ref_cache
from ._dist import Dist
from .loss import dpo_loss, linear_dpo_loss
from .train_config import TrainConfig


# ------------------------------------------------------------------------------------------------ load

def load_model(cfg: TrainConfig, train_pairs):
    """(tokenizer, model): --model from the hub or a directory, else a small seeded Llama + trained tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if cfg.model is None:
        from .tokenizer_train import trained_tokenizer
        tokenizer = trained_tokenizer(train_pairs, vocab_size=1024, cache_dir=cache_dir(cfg))
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        return tokenizer, AutoModelForCausalLM.from_config(config)
    if (os.path.isabs(cfg.model) or cfg.model.startswith(".")) and not os.path.isdir(cfg.model):
        raise ValueError(f"--model {cfg.model!r}: no such directory")
    if cfg.torch_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--torch-dtype must be float32, bfloat16 or float16, got {cfg.torch_dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.torch_dtype),
                                                     attn_implementation=cfg.attn_implementation)
    except OSError as e:
        raise ValueError(f"--model {cfg.model!r}: cannot load it ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def with_lora(model, cfg: TrainConfig):
    """Wrap in LoRA adapters (peft) when --lora-r > 0; the reference stays the base model."""
    if cfg.lora_r <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-r needs the peft package (pip install peft)") from None
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else targets.split(","))
    return get_peft_model(model, lora)


def cache_dir(cfg: TrainConfig) -> str:
    return cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fastdpo")


def reference_logps(policy, tokenizer, examples, cfg: TrainConfig, dist: Dist) -> torch.Tensor:
    """[n, 2] reference log-probs from the cache, or computed once (sharded across ranks) and cached."""
    key = ref_cache.fingerprint(policy.model, tokenizer, examples, cfg.max_length)
    # rank 0 reads the cache for everyone: ranks that disagreed (a node-local cache dir, a file another job is
    # writing) would run different numbers of collective forwards and hang
    cached = dist.from_main(ref_cache.load(cache_dir(cfg), key, len(examples)) if dist.main else None)
    if cached is not None:
        return cached
    part = ref_cache.compute(policy, dist.shard_even(examples), tokenizer.pad_token_id, cfg.batch_size,
                             dist.device, cfg.progress and dist.main)
    logps = dist.unshard(part, len(examples))
    if dist.main:
        ref_cache.save(cache_dir(cfg), key, logps)
    dist.barrier()
    return logps


# ------------------------------------------------------------------------------------------------ loop pieces

def batch_indices(k: int, n: int, batch_size: int, seed: int) -> list:
    """Micro-batch k of an endless stream of seeded per-epoch permutations: a pure function of k (exact resume)."""
    out = []
    pos = k * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def batch_loss(policy, examples, ref, idx, pad_id, cfg: TrainConfig, device):
    """The DPO loss and metrics of examples[idx]: backbone hidden states -> linear_dpo_loss."""
    batch = [examples[i] for i in idx]
    input_ids, mask, labels = (t.to(device) for t in prefdata.collate(batch, pad_id))
    ref_pairs = ref[idx].to(device=device, dtype=torch.float32)
    return policy(linear_dpo_loss, input_ids, mask, labels, ref_pairs[:, 0], ref_pairs[:, 1], beta=cfg.beta,
                  loss_type=cfg.loss_type)


@torch.no_grad()
def evaluate(policy, examples, ref, pad_id, cfg: TrainConfig, device) -> dict:
    """Reward accuracy and margin over the whole eval split."""
    was_training = policy.training
    policy.eval()
    pc, pr = [], []
    for s in range(0, len(examples), cfg.batch_size):
        batch = [t.to(device) for t in prefdata.collate(examples[s:s + cfg.batch_size], pad_id)]
        c, r = ref_cache.sequence_pair_logps(policy, *batch).chunk(2)
        pc.append(c)
        pr.append(r)
    policy.train(was_training)
    ref = ref.to(device=device, dtype=torch.float32)
    _, m = dpo_loss(torch.cat(pc), torch.cat(pr), ref[:, 0], ref[:, 1], beta=cfg.beta)
    return {"eval/accuracy": m["rewards/accuracies"].item(), "eval/margin": m["rewards/margins"].item()}


def lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else max(0.0, 1 - done)
    return f


# ------------------------------------------------------------------------------------------------ run directory

def prepare_output_dir(cfg: TrainConfig, main: bool = True) -> str:
    out = cfg.output_dir
    if cfg.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")   # one per process (torchrun ranks)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output-dir {out!r} is not writable ({e.strerror})") from None
    if cfg.resume:
        saved = os.path.join(out, "config.json")
        if not os.path.exists(os.path.join(out, "checkpoint", "state.pt")):
            raise ValueError(f"--resume: no checkpoint in {out!r}")
        with open(saved) as f:
            old = json.load(f)
        diff = [k for k in TrainConfig.RESUME_KEYS if old.get(k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"--resume: {out!r} was written by a different config ({', '.join(diff)} differ)")
    elif main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return out


# Checkpoints hold the full (unsharded) state on the CPU, keyed by parameter name, with or without FSDP.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(out, model, optimizer, scheduler, step, main: bool) -> dict:
    """Every rank calls it (under FSDP gathering the state is a collective); the main one writes it and gets the
    model state back (for save_pretrained). Atomic: the last complete checkpoint survives an interrupt during the
    next one."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=FULL_STATE)
    if not main:
        return {}
    path = os.path.join(out, "checkpoint")
    os.makedirs(path, exist_ok=True)
    state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "step": step, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                   "numpy": np.random.get_state()}}
    tmp = os.path.join(path, f"state.pt.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(path, "state.pt"))
    return model_state


def load_checkpoint(out, model, optimizer, scheduler) -> int:
    """Every rank reads the full state; under FSDP each keeps its shard."""
    # mmap: ranks on one machine share the file's pages instead of each holding a copy of the full state
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False, mmap=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=FULL_STATE)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]


def truncate_log(out, last_step: int):
    """Keep the metrics up to last_step (a resumed run rewrites what came after its checkpoint)."""
    path = os.path.join(out, "metrics.jsonl")
    keep = []
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def log(out, record, board=None):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if board is not None:
        for key, value in record.items():
            if key != "step":
                board.add_scalar(key, value, record["step"])


def tensorboard_writer(out, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, ekey, title in zip(axes, ["loss", "rewards/accuracies", "rewards/margins"],
                                    [None, "eval/accuracy", "eval/margin"], ["loss", "reward accuracy", "margin"]):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if ekey:
            ax.plot([r["step"] for r in evals], [r[ekey] for r in evals], "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ the algorithm

def train(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    dist = Dist(cfg.fsdp)
    out = prepare_output_dir(cfg, dist.main)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = dist.device

    # 1. load
    train_pairs, eval_pairs = prefdata.load_pairs(cfg.dataset, cfg.eval_fraction, cfg.seed)
    tokenizer, model = load_model(cfg, train_pairs)
    model = with_lora(model, cfg)
    policy = dist.wrap(ref_cache.Policy(model))    # on the device; with --fsdp sharded across the ranks
    train_ex = prefdata.tokenize(train_pairs, tokenizer, cfg.max_length, "train")
    eval_ex = prefdata.tokenize(eval_pairs, tokenizer, cfg.max_length, "eval")
    pad = tokenizer.pad_token_id

    # 2. reference log-probs, once: the initial policy is the reference; no second model is kept
    ref_train = reference_logps(policy, tokenizer, train_ex, cfg, dist)
    ref_eval = reference_logps(policy, tokenizer, eval_ex, cfg, dist)

    # 3. loop
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    board = tensorboard_writer(out, cfg) if dist.main else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start = load_checkpoint(out, model, optimizer, scheduler) if cfg.resume else 0
    if dist.main:
        truncate_log(out, start if cfg.resume else -1)
    before = evaluate(policy, eval_ex, ref_eval, pad, cfg, device) if start == 0 else None
    if before and dist.main:
        log(out, {"step": 0, **before})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(start, cfg.steps), desc="training", disable=not (cfg.progress and dist.main), initial=start,
               total=cfg.steps)
    for step in bar:
        totals = {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step * cfg.grad_accum + micro, len(train_ex), cfg.batch_size, cfg.seed)
            with autocast:
                loss, metrics = batch_loss(policy, train_ex, ref_train, dist.shard(idx), pad, cfg, device)
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        dist.average_grads(params)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "lr": scheduler.get_last_lr()[0],
                  **{k: dist.mean_(v).item() for k, v in totals.items()}}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            record.update(evaluate(policy, eval_ex, ref_eval, pad, cfg, device))
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
        if dist.main:
            log(out, record, board)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, model, optimizer, scheduler, step + 1, dist.main)

    # 4. save
    after = evaluate(policy, eval_ex, ref_eval, pad, cfg, device)
    summary = {"before": before, "after": after, "train_examples": len(train_ex), "eval_examples": len(eval_ex)}
    model_state = save_checkpoint(out, model, optimizer, scheduler, cfg.steps, dist.main)
    if dist.main:
        log(out, {"step": cfg.steps, **after}, board)
        if board is not None:
            board.close()
        final = os.path.join(out, "model")
        model.save_pretrained(final, state_dict=model_state)
        tokenizer.save_pretrained(final)
        summary.update(plot=plot(out), model=final)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    dist.barrier()
    return summary
