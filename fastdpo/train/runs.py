"""The run directory: its checks before anything loads, its config, and checkpoints laid out as the Hugging Face
Trainer lays them out.

``checkpoint-N/`` holds the model (or the LoRA adapter) via ``save_pretrained`` (safetensors), ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state.pt`` and ``trainer_state.json`` (the log history). Resuming reads the
weights from the safetensors files and everything else with ``torch.load(weights_only=True)``: nothing in a
checkpoint directory can run code. Checkpoints hold the full (unsharded) state, with or without FSDP.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import __version__
from .config import FIELDS, TrainConfig

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "training.png", "model", "tensorboard", "wandb")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)


def checkpoints(out: str) -> list:
    """[(step, path)] of the checkpoint-N directories in ``out``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(out, "checkpoint-*")):
        m = CHECKPOINT.match(os.path.basename(path))
        if m and os.path.exists(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resume_path(cfg: TrainConfig) -> str:
    """The checkpoint --resume continues from: the newest in --output-dir, or the one given."""
    out = cfg.output_dir
    if cfg.resume != "latest":
        path = os.path.abspath(os.path.expanduser(cfg.resume))
        if not os.path.exists(os.path.join(path, "trainer_state.json")):
            raise ValueError(f"--resume {cfg.resume!r}: not a checkpoint directory (no trainer_state.json)")
        return path
    found = checkpoints(out)
    if found:
        return found[-1][1]
    if os.path.exists(os.path.join(out, "checkpoint", "state.pt")):
        raise ValueError(f"--resume: {out!r} holds a checkpoint of fastdpo 0.1 (checkpoint/state.pt), which is a "
                         "pickle and is no longer loaded (it could run code); start the run again, or resume it "
                         "with fastdpo 0.1")
    raise ValueError(f"--resume: no checkpoint in {out!r}")


def check_output_dir(cfg: TrainConfig, world: int) -> str:
    """Every check on --output-dir that needs no data or model, before any of them is loaded; writes nothing
    that stays."""
    out = cfg.output_dir
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out!r} is a file")
    parent = out
    while not os.path.exists(parent):            # the directory is made later, once data and model have loaded
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output-dir {out!r} is not writable ({parent!r} is a file)")
    try:
        probe = os.path.join(parent, f".write-test-{os.getpid()}")   # one per process (torchrun ranks)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output-dir {out!r} is not writable ({e.strerror})") from None
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))] + [os.path.basename(p) for _, p in
                                                                              checkpoints(out)][:1]
    if cfg.resume:
        path = resume_path(cfg)
        try:
            with open(os.path.join(out, "config.json")) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise ValueError(f"--resume: {out!r} has no readable config.json") from None
        check_same_config(cfg, old, out)
        done = checkpoint_step(path)
        if done >= cfg.steps:
            raise ValueError(f"--resume: the run in {out!r} is at step {done} already; raise --steps to continue")
    elif held and not cfg.overwrite:
        raise ValueError(f"--output-dir {out!r} already holds a run ({', '.join(held)}); pass --resume to continue "
                         "it or --overwrite to replace it")
    return out


def check_same_config(cfg: TrainConfig, old: dict, out: str) -> None:
    """--resume: the options that change what is computed must be the saved ones (those still on auto, such as
    the layout before the model is loaded, are compared once resolved)."""
    # a key the saved config lacks (written before the option existed) had the option's default
    old = {**{k: f.default for k, f in FIELDS.items()}, **old}
    diff = [k for k in TrainConfig.RESUME_KEYS if getattr(cfg, k) is not None and old.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--resume: {out!r} was written by a different config ({', '.join(diff)} differ: "
                         + "; ".join(f"{k} {old.get(k)!r} then, {getattr(cfg, k)!r} now" for k in diff) + ")")


def start_run(cfg: TrainConfig, main: bool) -> None:
    """Once data and model have loaded: a resumed run's config checked again (with the layout resolved), an
    overwritten run's files removed, the config written."""
    out = cfg.output_dir
    if cfg.resume:                                 # every rank: they all stop, or none does
        with open(os.path.join(out, "config.json")) as f:
            check_same_config(cfg, json.load(f), out)
    if not main:
        return
    os.makedirs(out, exist_ok=True)
    if cfg.overwrite:
        for path in [os.path.join(out, name) for name in RUN_FILES + ("checkpoint",)] + \
                [p for _, p in checkpoints(out)]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    path = os.path.join(out, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**cfg.to_dict(), "fastdpo_version": __version__}, f, indent=2)
    os.replace(tmp, path)


def checkpoint_step(path: str) -> int:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


# ------------------------------------------------------------------------------------------------ checkpoints

def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_checkpoint(cfg: TrainConfig, model, optimizer, scheduler, scaler, step: int, epoch: float, history: list,
                    main: bool) -> dict:
    """checkpoint-<step>/ (rotated by --save-total-limit). Every rank calls it (under FSDP gathering the state is
    a collective); the main one writes it and gets the model state back (for the final save_pretrained). Written
    under a temporary name and renamed: an interrupt never leaves a partial checkpoint-N."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=FULL_STATE)
    if not main:
        return {}
    out = cfg.output_dir
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f".checkpoint-{step}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=dict(model_state), safe_serialization=True)   # it may consume the dict
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    torch.save({"torch": torch.get_rng_state(), "python": [py_version, list(py_state), py_gauss],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]},
               os.path.join(tmp, "rng_state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "max_steps": cfg.steps, "epoch": epoch, "logging_steps": cfg.logging_steps,
                   "save_steps": cfg.save_every, "train_batch_size": cfg.batch_size, "log_history": history}, f,
                  indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.save_total_limit:
        for _, old in checkpoints(out)[:-cfg.save_total_limit]:
            shutil.rmtree(old)
    return model_state


def _load_weights(path: str, model) -> dict:
    """The model state of checkpoint ``path`` keyed as the model's state_dict: the full model's safetensors, or
    the adapter's with PEFT's file names mapped back to the model's (adapter name included)."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(path, "adapter_model*.safetensors" if _is_peft(model)
                                          else "model*.safetensors")))
    if not files:
        raise ValueError(f"--resume: {path!r} holds no model weights (safetensors)")
    saved = {}
    for f in files:
        saved.update(load_file(f))
    if not _is_peft(model):
        return saved
    from peft import get_peft_model_state_dict
    names = get_peft_model_state_dict(model, state_dict={k: k for k in model.state_dict()})
    missing = set(names) - set(saved)
    if missing:
        raise ValueError(f"--resume: {path!r} lacks adapter weights {sorted(missing)[:3]}")
    return {names[k]: v for k, v in saved.items()}


def load_checkpoint(path: str, model, optimizer, scheduler, scaler) -> tuple:
    """(step, log history) of checkpoint ``path``, its state loaded into model, optimizer, scheduler, scaler and
    the RNGs. Every rank reads it; under FSDP each keeps its shard."""
    weights = _load_weights(path, model)
    names = dict(model.named_parameters(remove_duplicate=False))
    unique = {id(p) for n, p in names.items() if n in weights}
    absent = [n for n, p in names.items() if n not in weights and id(p) not in unique and p.requires_grad]
    if absent:
        raise ValueError(f"--resume: {path!r} lacks the weights of {absent[:3]}")
    optimizer_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=LOAD_STATE)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))
    rng = torch.load(os.path.join(path, "rng_state.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    return state["global_step"], state["log_history"]
