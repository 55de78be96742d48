"""The policy's forward, and the reference log-probs cached on disk by a fingerprint of everything that
determines them.

The cache file holds a header (fingerprint, count) and the [n, 2] float64 log-probs with a checksum; it is
written to a temporary file and renamed, so an interrupted run never leaves a partial cache under the final
name, and a partial or corrupt file is detected (and recomputed), never used.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from ..models import output_head


class Policy(torch.nn.Module):
    """A causal LM whose forward runs ``fn(model, ...)``: a model-level fused op (``model_sequence_logps``,
    ``model_dpo_loss``) that runs the backbone and hands the output head to the fused kernels.

    One forward for all of it because FSDP gathers a unit's parameters only inside that unit's forward: this
    module is the root unit, so its forward gathers the embeddings, final norm and lm_head weight (tied or not)
    that the op reads outside the backbone, and its backward reduce-scatters their gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

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


def _path(cache_dir, key):
    return os.path.join(cache_dir, f"ref-logps-{key[:32]}.pt")


def load(cache_dir, key, n):
    """The cached [n, 2] tensor, or None when absent, partial, corrupt or for another key."""
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
    return logps if ok else None


def save(cache_dir, key, logps):
    os.makedirs(cache_dir, exist_ok=True)
    path = _path(cache_dir, key)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"key": key, "logps": logps, "sha256": hashlib.sha256(logps.numpy().tobytes()).hexdigest()}, tmp)
    os.replace(tmp, path)
    return path
