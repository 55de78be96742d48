"""The policy's forward, and the reference log-probs cached on disk by a fingerprint of everything that
determines them.

The cache file holds a header (fingerprint, count) and the [n, 2] float64 log-probs with a checksum; it is
written to a temporary file and renamed, so an interrupted run never leaves a partial cache under the final
name, and a partial or corrupt file is detected (and recomputed), never used.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time

import torch

from ..models import output_head
from .runs import remove_temporaries, writing


class Policy(torch.nn.Module):
    """A causal LM whose forward runs ``fn(model, ...)``: a model-level fused op (``model_sequence_logps``,
    ``model_dpo_loss``) that runs the backbone and hands the output head to the fused kernels.

    One forward for all of it because FSDP gathers a unit's parameters only inside that unit's forward: this
    module is the root unit, so its forward gathers the embeddings, final norm and lm_head weight (tied or not)
    that the op reads outside the backbone, and its backward reduce-scatters their gradients.

    ``sequence``: the ``fastdpo.sequence_parallel.SequenceGroup`` whose ranks split each forward's rows (None: this
    process computes its rows whole)."""

    def __init__(self, model, sequence=None):
        super().__init__()
        self.model = model
        self.sequence = sequence

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _hasher():
    h = hashlib.sha256()

    def add(text: str):
        h.update(text.encode())
        h.update(b"\0")
    return h, add


def model_digest(model) -> str:
    """sha256 of the model as the reference pass sees it: every weight (name, dtype, shape, bytes), its config (and
    PEFT config) and its resolved output head."""
    h, add = _hasher()
    for name, t in sorted(model.state_dict().items()):
        add(f"{name}:{t.dtype}:{tuple(t.shape)}")
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add(base.config.to_json_string(use_diff=False))
    for name, peft in sorted(getattr(model, "peft_config", {}).items()):
        add(f"peft {name}: {json.dumps(peft.to_dict(), sort_keys=True, default=str)}")
    head = output_head(model)
    add(f"head scale={head.logit_scale!r} softcap={head.softcap!r} bias={head.bias is not None} "
        f"lora={len(head.lora)} width={head.weight.shape[1]}")
    return h.hexdigest()


def fingerprint(digest: str, examples, settings: dict) -> str:
    """The cache key of one split's reference log-probs: the model digest, the token ids of every example (so the
    tokenizer and the length rules are covered by what they produced) and ``settings`` (compute dtype, attention,
    batching, versions: whatever changes the arithmetic)."""
    h, add = _hasher()
    add(digest)
    for e in examples:
        add(json.dumps([e.prompt, e.chosen, e.rejected]))
    add(json.dumps(settings, sort_keys=True, default=str))
    return h.hexdigest()


PATTERN = "ref-logps-*.pt"


def _path(cache_dir, key):
    return os.path.join(cache_dir, f"ref-logps-{key[:32]}.pt")


def load(cache_dir, key, n):
    """The cached [n, 2] tensor, or None when absent, partial, corrupt or for another key. A hit refreshes the
    file's modification time: ``fastdpo cache prune`` drops the least recently used first."""
    path = _path(cache_dir, key)
    if not os.path.exists(path):
        return None
    try:
        blob = torch.load(path, weights_only=True)
        logps = blob["logps"]
        ok = (blob["key"] == key and tuple(logps.shape) == (n, 2)
              and blob["sha256"] == hashlib.sha256(logps.numpy().tobytes()).hexdigest())
    except Exception:   # truncated or unreadable file: recompute
        ok = False
    if ok:
        with contextlib.suppress(OSError):
            os.utime(path)
    return logps if ok else None


def save(cache_dir, key, logps, about: dict | None = None):
    """Write the [n, 2] log-probs under their key (``about``: what ``fastdpo cache list`` shows of them)."""
    path = _path(cache_dir, key)
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(path, "--cache-dir", partial=tmp):
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"key": key, "logps": logps, "sha256": hashlib.sha256(logps.numpy().tobytes()).hexdigest(),
                    "about": about or {}}, tmp)
        os.replace(tmp, path)
    return path


def remove_partial(cache_dir) -> None:
    """The partial files of writers that were killed (their process is gone); the cache is shared by runs."""
    if os.path.isdir(cache_dir):
        remove_temporaries(cache_dir, live=True)


def entries(cache_dir) -> list:
    """[(path, bytes, last used, about)] of the cached reference log-probs, most recently used first."""
    found = []
    for path in glob.glob(os.path.join(cache_dir, PATTERN)):
        st = os.stat(path)
        try:
            about = torch.load(path, weights_only=True).get("about", {})
        except Exception:
            about = {"unreadable": True}
        found.append((path, st.st_size, st.st_mtime, about))
    return sorted(found, key=lambda e: -e[2])


def prune(cache_dir, *, max_bytes=None, older_than_days=None) -> list:
    """Delete the least recently used entries until the rest fit ``max_bytes``, and every entry unused for
    ``older_than_days``; returns the deleted paths. A deleted entry is only recomputed when a run needs it."""
    removed, total, now = [], 0, time.time()
    for path, size, used, _ in entries(cache_dir):
        stale = older_than_days is not None and now - used > older_than_days * 86400
        if stale or (max_bytes is not None and total + size > max_bytes):
            os.remove(path)
            removed.append(path)
        else:
            total += size
    return removed
