"""The policy's forward and the reference pass, once: per-example reference log-probs under no-grad, cached on
disk by fingerprint.

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
        if hasattr(t, "full_tensor"):  # FSDP: a DTensor shard; the full tensor is gathered (every rank calls this)
            t = t.full_tensor()
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


class Policy(torch.nn.Module):
    """A causal LM whose forward runs the backbone, then ``op(hidden, lm_head weight, labels, ...)``: a fused op
    (sequence_logps, linear_dpo_loss) in place of the logits.

    One forward for all of it because FSDP gathers a unit's parameters only inside that unit's forward: this
    module is the root unit, so its forward gathers the embeddings, final norm and lm_head weight (tied or not)
    that the op reads outside the backbone, and its backward reduce-scatters their gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, op, input_ids, mask, labels, *args, **kwargs):
        hidden, weight, options = lm_head_inputs(self.model, input_ids, mask)
        return op(hidden, weight, labels, *args, **options, **kwargs)


def sequence_pair_logps(policy: Policy, input_ids, mask, labels):
    """[2B] summed log-probs of a collated batch through the backbone and the fused log-prob op."""
    return policy(sequence_logps, input_ids, mask, labels)


@torch.no_grad()
def compute(policy: Policy, examples, pad_id, batch_size, device, progress) -> torch.Tensor:
    """[n, 2] (chosen, rejected) reference log-probs, in data order."""
    from tqdm.auto import tqdm

    out = []
    was_training = policy.training
    policy.eval()
    # LoRA: the reference is the base model with its adapters disabled
    model = policy.model
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapters_off:
        for s in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", disable=not progress):
            batch = [t.to(device) for t in prefdata.collate(examples[s:s + batch_size], pad_id)]
            c, r = sequence_pair_logps(policy, *batch).double().chunk(2)
            out.append(torch.stack([c, r], 1).cpu())
    policy.train(was_training)
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
