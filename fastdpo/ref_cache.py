"""The reference pass, once: per-example reference log-probs under no-grad, cached on disk by fingerprint.

The cache file holds a header (fingerprint, count) and the [n, 2] float64 log-probs with a checksum; it is
written to a temporary file and renamed, so an interrupted run never leaves a partial cache under the final
name, and a partial or corrupt file is detected (and recomputed), never used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch

from . import prefdata
from .logps import sequence_logps


def fingerprint(model, tokenizer, examples, max_length: int) -> str:
    """sha256 of the reference weights, the tokenizer's vocabulary, the tokenized data and the length setting."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:            # LoRA: the reference is the base model, adapters disabled
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected]).encode())
    h.update(str(max_length).encode())
    return h.hexdigest()


def lm_head_inputs(model, input_ids, mask):
    """(hidden [B, L-1, D], lm_head weight [V, D], options) of a causal LM, a PEFT-wrapped one included:
    the backbone runs, the logits are left to the fused op (honouring logit softcapping and scaling)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
    cfg = base.config
    options = dict(softcap=getattr(cfg, "final_logit_softcapping", None),
                   logit_scale=getattr(cfg, "logit_scale", None) or 1.0)
    return hidden, base.get_output_embeddings().weight, options


def sequence_pair_logps(model, input_ids, mask, labels):
    """[2B] summed log-probs of a collated batch through the backbone and the fused log-prob op."""
    hidden, weight, options = lm_head_inputs(model, input_ids, mask)
    return sequence_logps(hidden, weight, labels, **options)


@torch.no_grad()
def compute(model, examples, pad_id, batch_size, device, progress) -> torch.Tensor:
    """[n, 2] (chosen, rejected) reference log-probs, in data order."""
    from tqdm.auto import tqdm

    out = []
    was_training = model.training
    model.eval()
    # LoRA: the reference is the base model with its adapters disabled
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapters_off:
        for s in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", disable=not progress):
            batch = [t.to(device) for t in prefdata.collate(examples[s:s + batch_size], pad_id)]
            c, r = sequence_pair_logps(model, *batch).double().chunk(2)
            out.append(torch.stack([c, r], 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 2, dtype=torch.float64)


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
