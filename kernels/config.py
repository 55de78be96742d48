"""Every launch configuration in one place.

Fixed configurations by default. ``FASTDPO_BLOCKS="BN,BV,BD,WARPS"`` overrides
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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 bit patterns in tl.dot (triton #11584): upcast there."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (as torch.mm does by default), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def linear_blocks(dtype: torch.dtype, backward: bool) -> Blocks:
    override = os.environ.get("FASTDPO_BLOCKS")
    if override:
        bn, bv, bd, warps = (int(x) for x in override.split(","))
        return Blocks(bn, bv, bd, warps)
    if interpreting():
        return Blocks(16, 32, 16, 4)
    if dtype == torch.float32:
        return Blocks(64, 64, 32, 4)
    return Blocks(128, 128, 64, 8, 3) if backward else Blocks(128, 128, 64, 8, 3)


def logits_blocks() -> Blocks:
    if interpreting():
        return Blocks(4, 32, 1, 4)
    return Blocks(1, 2048, 1, 8)
