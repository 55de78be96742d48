"""Argument checks shared by every entry point.

Each failure is a ``TypeError``/``ValueError`` naming the argument and what was
expected, raised before any kernel runs.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_float_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_labels(labels, shape: tuple, device: torch.device, vocab: int, ignore_index: int) -> torch.Tensor:
    """Return ``labels`` as int64 after checking type, shape, device and range."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} to match the input, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the input is on {device}")
    labels = labels.long()
    scored = labels != ignore_index
    # One reduction over [B, T] integers; the single host sync is the price of
    # an error here instead of an out-of-bounds read inside a kernel.
    bad = scored & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )
    return labels


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_transform(logit_scale, softcap, temperature) -> None:
    for name, value in (("logit_scale", logit_scale), ("temperature", temperature), ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if not _is_number(value):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            kind = "None or a finite number > 0" if name == "softcap" else "a finite number > 0"
            raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_linear_inputs(hidden, weight, bias) -> None:
    """hidden [B, T, D], weight [V, D], bias [V] or None: same dtype and device."""
    _check_float_tensor("hidden", hidden, 3)
    _check_float_tensor("weight", weight, 2)
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden is an empty batch: shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[2]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (V), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")


def check_logits(logits) -> None:
    _check_float_tensor("logits", logits, 3)
    if logits.shape[0] == 0 or logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f"logits is empty: shape {tuple(logits.shape)}")
