"""Every launch configuration in one place.

Fixed configurations by default. ``FASTDPO_BLOCKS="BN,BV,BD,WARPS[,STAGES]"`` overrides
the linear kernels' tiles for experiments (e.g. tuning on a new card).
Under ``TRITON_INTERPRET=1`` small tiles keep the CPU interpreter quick and
exercise every boundary of the loops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int = 2


# Triton decides at import whether its kernels are interpreted; read it once, here, at the same moment.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 bit patterns in tl.dot (triton #11584): upcast there."""
    return INTERPRETING and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (as torch.mm does by default), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def linear_blocks(dtype: torch.dtype) -> Blocks:
    override = os.environ.get("FASTDPO_BLOCKS")
    if override:
        return _parse_blocks(override)
    if INTERPRETING:
        return Blocks(16, 32, 16, 4)
    if dtype == torch.float32:
        return Blocks(64, 64, 32, 4)
    return Blocks(128, 256, 64, 8, 3)       # H200, bench/gpu_tune.py: fastest of those tried (bench/RESULTS.md)


# Forward programs aimed for, per multiprocessor: with few rows (short batches, long vocabularies)
# the vocabulary is split across programs so that every multiprocessor has work.
FWD_PROGRAMS_PER_SM = 8


def vocab_splits(n_blocks: int, v_blocks: int, device: torch.device) -> int:
    """How many vocabulary splits the forward uses (the interpreter: 2, to exercise the combine)."""
    if INTERPRETING or device.type != "cuda":
        return min(2, v_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_blocks, -(-FWD_PROGRAMS_PER_SM * sms // n_blocks)))


# The products backward's gradient buffer dL [rows, V] (input dtype): large products, bounded memory.
DLOGITS_BYTES = 256 << 20


def dlogits_rows(vocab: int, itemsize: int, block_n: int) -> int:
    """Rows per chunk of the products backward, a multiple of BLOCK_N (the interpreter: two blocks,
    so that the tests cross chunk boundaries)."""
    if INTERPRETING:
        return 2 * block_n
    return max(block_n, DLOGITS_BYTES // (vocab * itemsize) // block_n * block_n)


def backward_mode() -> str:
    """``FASTDPO_BWD``: "products" (default: dL chunks + matrix products) or "fused" (one kernel, atomics)."""
    mode = os.environ.get("FASTDPO_BWD", "products")
    if mode not in ("products", "fused"):
        raise ValueError(f"FASTDPO_BWD must be 'products' or 'fused', got {mode!r}")
    return mode


def _parse_blocks(text: str) -> Blocks:
    try:
        bn, bv, bd, warps, *stages = (int(x) for x in text.split(","))
        if len(stages) > 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"FASTDPO_BLOCKS must be 'BLOCK_N,BLOCK_V,BLOCK_D,WARPS[,STAGES]' integers, "
                         f"got {text!r}") from None
    for name, v in (("BLOCK_N", bn), ("BLOCK_V", bv), ("BLOCK_D", bd), ("WARPS", warps)):
        if v < 1 or v & (v - 1) or (name != "WARPS" and v < 16):
            raise ValueError(f"FASTDPO_BLOCKS: {name}={v} must be a power of two (tiles >= 16), got {text!r}")
    if stages and stages[0] < 1:
        raise ValueError(f"FASTDPO_BLOCKS: STAGES={stages[0]} must be >= 1, got {text!r}")
    return Blocks(bn, bv, bd, warps, *stages)


def logits_blocks() -> Blocks:
    if INTERPRETING:
        return Blocks(4, 32, 1, 4)
    return Blocks(1, 2048, 1, 8)
