"""The run directory: its checks before anything loads, its config, and checkpoints laid out as the Hugging Face
Trainer lays them out.

``checkpoint-N/`` holds the model (or the LoRA adapter) via ``save_pretrained`` (safetensors), ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state.pt`` and ``trainer_state.json`` (the log history). Resuming reads the
weights from the safetensors files and everything else with ``torch.load(weights_only=True)``: nothing in a
checkpoint directory can run code. Checkpoints hold the full (unsharded) state, with or without FSDP.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import __version__
from .config import FIELDS, TrainConfig

LOCK = ".fastdpo-lock"
TEMPORARY = re.compile(r"\.tmp-\d+$")                      # what every writer here names its partial files
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


# ------------------------------------------------------------------------------------------------ one writer

class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<output-dir>/.fastdpo-lock``, taken by the main
    process and held until the run ends. The kernel drops it when its process ends in any way (kill -9 included),
    so a lock left behind by a dead run is never in the way. The file records the holder (pid, host, start) for
    the message a second run gets."""

    def __init__(self, out: str):
        self.out, self.fd = out, None

    def acquire(self) -> str | None:
        """None once held (or when ``--output-dir`` does not exist yet: taken again after it is made), else the
        one-line refusal naming the process that holds it."""
        if self.fd is not None or not os.path.isdir(self.out):
            return None
        path = os.path.join(self.out, LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"--output-dir {self.out!r}: cannot create its lock file {LOCK} ({e.strerror})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"--output-dir {self.out!r} is in use by another fastdpo train ({holder}); wait for it, or give "
                    "another --output-dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%F %T')}\n".encode(), 0)
        self.fd = fd
        remove_temporaries(self.out)          # partial writes of a killed run: nobody else writes here now
        return None

    def hold(self, dist) -> None:
        """Every rank calls it: the main process takes the lock, and all stop with its refusal if it cannot."""
        refusal = dist.from_main(self.acquire() if dist.main else None)
        if refusal:
            raise ValueError(refusal)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                  # closing drops the flock
            self.fd = None


def remove_temporaries(folder: str, live=None) -> None:
    """Delete the partial files and directories (``*.tmp-PID``) that a killed writer left in ``folder``; with
    ``live``, only those whose PID is not a running process of this machine (a folder others may be writing in)."""
    for name in os.listdir(folder):
        m = TEMPORARY.search(name)
        if m is None or (live and _alive(int(name[m.start() + 5:]))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def writing(path: str, option: str, partial: str | None = None, note: str = ""):
    """Any failure while writing ``path`` -> the partial file or directory ``partial`` removed and one line naming
    the path, the option that chose it and the cause (a full disk as such, whatever layer noticed it first)."""
    try:
        yield
    except Exception as e:
        if partial is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(partial) if os.path.isdir(partial) else os.remove(partial)
        raise ValueError(f"{option}: cannot write {path!r} ({_cause(e, path)}){note}") from e


def _cause(e: Exception, path: str) -> str:
    text = str(e)
    err = getattr(e, "errno", None)
    if err == errno.ENOSPC or "No space left" in text or "StorageFull" in text or _disk_full(path):
        return "no space left on the device"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _disk_full(path: str) -> bool:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free < 1 << 20
    except OSError:
        return False


def check_writable(folder: str, option: str) -> None:
    """``folder`` (or, where it does not exist yet, its nearest existing parent) can be written; leaves nothing."""
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {folder!r} is not writable ({parent!r} is a file)")
    probe = os.path.join(parent, f".write-test.tmp-{os.getpid()}")   # one per process (torchrun ranks)
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{option} {folder!r} is not writable ({e.strerror})") from None


# ------------------------------------------------------------------------------------------------ what a run read

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".py")


def source_key(name: str | None) -> str | None:
    """A cheap key of a model directory (or its hub snapshot) as loaded: each weight, config, tokenizer and code
    file's name, size, modification time and, for safetensors, its header. Sound without reading the weights: any
    write of a file sets its modification time (a retrained model rewritten with the same tensor names and shapes
    differs there), and the header names every tensor's dtype, shape and offsets. A copy that keeps the times
    (``cp -p``) keeps the key; only a content change with the time set back by hand escapes it."""
    if name is None:
        return None
    folder = name if os.path.isdir(name) else _hub_snapshot(name)
    if folder is None:
        return None
    h = hashlib.sha256()
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not entry.endswith(WEIGHT_FILES) or entry.lower().startswith(("readme", "license")) \
                or not os.path.isfile(path):
            continue
        st = os.stat(path)                                     # hub snapshots link to blobs: the blob's
        h.update(f"{entry}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        if entry.endswith(".safetensors"):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(size, 100 << 20)))
    return h.hexdigest()


def _hub_snapshot(name: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:          # not a hub name in the local cache (then nothing of it can have changed there)
        return None


def data_key(examples) -> str:
    """sha256 of the token ids of every example (prompt, chosen, rejected), in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected]).encode())
    return h.hexdigest()


INPUTS = {"model": "--model", "ref_model": "--ref-model", "train_data": "the training data (--dataset)",
          "eval_data": "the evaluation data (--eval-dataset / --eval-fraction)"}


def run_inputs(cfg: TrainConfig, train_examples, eval_examples) -> dict:
    """What --resume compares: the keys of the model and reference weights and of the tokenized data."""
    return {"model": source_key(cfg.model), "ref_model": source_key(cfg.ref_model),
            "train_data": data_key(train_examples), "eval_data": data_key(eval_examples)}


def check_same_inputs(cfg: TrainConfig, old: dict, new: dict) -> None:
    """--resume: refuse when a model's files or the tokenized data differ from those the run started with."""
    if "inputs" not in old:            # written before fastdpo recorded them: nothing to compare
        return
    changed = [k for k in INPUTS if old["inputs"].get(k) != new[k]]
    if changed:
        what = " and ".join(INPUTS[k] for k in changed)
        raise ValueError(f"--resume: {what} changed since the run in {cfg.output_dir!r} started; resuming would "
                         "mix two runs. To train on from its weights on purpose, start a new run with --model "
                         f"{os.path.join(cfg.output_dir, 'checkpoint-N')!r} (and --tokenizer) in a new --output-dir")


def check_output_dir(cfg: TrainConfig, world: int, cache: str) -> str:
    """Every check on --output-dir and the cache directory that needs no data or model, before any of them is
    loaded; writes nothing that stays. ``world``: the data-parallel processes (groups under sequence parallelism)."""
    out = cfg.output_dir
    if cfg.batch_size % world:
        groups = " (processes / --sequence-parallel)" if cfg.sequence_parallel > 1 else ""
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes{groups} "
                         f"({world})")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out!r} is a file")
    check_writable(out, "--output-dir")      # the directory itself is made once data and model have loaded
    check_writable(cache, "--cache-dir")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))] + [os.path.basename(p) for _, p in
                                                                              checkpoints(out)][:1]
    if cfg.resume:
        path = resume_path(cfg)
        check_same_config(cfg, saved_config(out), out)
        done = checkpoint_step(path)
        if done >= cfg.steps:
            raise ValueError(f"--resume: the run in {out!r} is at step {done} already; raise --steps to continue")
    elif held and not cfg.overwrite:
        raise ValueError(f"--output-dir {out!r} already holds a run ({', '.join(held)}); pass --resume to continue "
                         "it or --overwrite to replace it")
    return out


def saved_config(out: str) -> dict:
    try:
        with open(os.path.join(out, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"--resume: {out!r} has no readable config.json") from None


def check_same_config(cfg: TrainConfig, old: dict, out: str) -> None:
    """--resume: the options that change what is computed must be the saved ones (those still on auto, such as
    the layout before the model is loaded, are compared once resolved)."""
    # a key the saved config lacks (written before the option existed) had the option's default
    old = {**{k: f.default for k, f in FIELDS.items()}, **old}
    diff = [k for k in TrainConfig.RESUME_KEYS if getattr(cfg, k) is not None and old.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--resume: {out!r} was written by a different config ({', '.join(diff)} differ: "
                         + "; ".join(f"{k} {old.get(k)!r} then, {getattr(cfg, k)!r} now" for k in diff) + ")")


def start_run(cfg: TrainConfig, dist, lock: RunLock, inputs: dict) -> None:
    """Once data and model have loaded: a resumed run's config checked again (with the layout resolved) and its
    inputs (model files, tokenized data) compared, the directory made and locked, an overwritten run's files
    removed, the config written with the inputs' keys."""
    out = cfg.output_dir
    if cfg.resume:                                 # every rank: they all stop, or none does
        old = saved_config(out)
        check_same_config(cfg, old, out)
        check_same_inputs(cfg, old, inputs)
    if dist.main:
        with writing(out, "--output-dir"):
            os.makedirs(out, exist_ok=True)
    lock.hold(dist)                                # a run whose directory is new takes it here
    if not dist.main:
        return
    if cfg.overwrite:
        for path in [os.path.join(out, name) for name in RUN_FILES + ("checkpoint",)] + \
                [p for _, p in checkpoints(out)]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    path = os.path.join(out, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(path, "--output-dir", partial=tmp):
        with open(tmp, "w") as f:
            json.dump({**cfg.to_dict(), "fastdpo_version": __version__, "inputs": inputs}, f, indent=2)
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
    kept = [os.path.basename(p) for n, p in checkpoints(out) if n != step][-1:]
    note = f"; the last good checkpoint, {kept[0]}, is intact" if kept else "; no checkpoint was written before it"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(final, "--output-dir", partial=tmp, note=note):
        model.save_pretrained(tmp, state_dict=dict(model_state), safe_serialization=True)  # it may consume the dict
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        py_version, py_state, py_gauss = random.getstate()
        np_state = np.random.get_state()
        torch.save({"torch": torch.get_rng_state(), "python": [py_version, list(py_state), py_gauss],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]},
                   os.path.join(tmp, "rng_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step, "max_steps": cfg.steps, "epoch": epoch,
                       "logging_steps": cfg.logging_steps, "save_steps": cfg.save_every,
                       "train_batch_size": cfg.batch_size, "log_history": history}, f, indent=2)
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
