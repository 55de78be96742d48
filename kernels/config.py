"""Every launch configuration in one place.

Fixed configurations by default. ``FASTDPO_BLOCKS="BN,BV,BD,WARPS[,STAGES]"`` overrides
the linear kernels' bf16/fp16 tiles for experiments (e.g. tuning on a new card), ``FASTDPO_SLICE_MB``
the vocabulary backward's dL workspace. The paths themselves: ``FASTDPO_FWD``,
``FASTDPO_BWD`` and ``FASTDPO_ONE_PASS`` (below). The chunk schedules are pure
functions of the sizes (``vocab_slices``, ``forward_tiles``), so that
tests can check the GPU's schedule on the CPU.
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


# The linear kernels' fixed tiles on CUDA, per kernel ("forward": _logps_fwd_kernel, "dlogits":
# _dlogits_kernel, "fused": _logps_bwd_kernel) and input width (16: bf16/fp16, 32: fp32), in at most 96 KiB
# of shared memory (sm_86/sm_89 have 99 KiB). bench/static_check.py compiles them for sm_80 and sm_90: the
# default paths (forward, dlogits) without a register spill; the fused backward's are the best found, and
# some of its specializations still spill (bench/RESULTS.md). The 16-bit forward and dlogits tiles replaced
# 128,256,64,8,3 (the H200's fastest of those tried), which spilled on both targets; their speed is unmeasured.
CUDA_BLOCKS = {
    ("forward", 16): Blocks(128, 128, 64, 8, 3),
    ("dlogits", 16): Blocks(128, 128, 64, 8, 3),
    ("fused", 16): Blocks(64, 128, 64, 8, 3),
    ("forward", 32): Blocks(64, 64, 32, 4),
    ("dlogits", 32): Blocks(64, 64, 32, 4),
    ("fused", 32): Blocks(32, 64, 32, 8),
}
KERNELS = ("forward", "dlogits", "fused")


def linear_blocks(dtype: torch.dtype, device: torch.device, kernel: str) -> Blocks:
    """The tiles of one of the linear kernels (KERNELS) for inputs of this dtype on this device.
    ``FASTDPO_BLOCKS`` overrides those of bf16/fp16 inputs (the tensor-core paths it tunes); fp32 keeps its own."""
    assert kernel in KERNELS, kernel
    override = os.environ.get("FASTDPO_BLOCKS")
    if override and dtype != torch.float32:
        return _parse_blocks(override)
    if multiprocessors(device) is None:                  # the interpreter
        return Blocks(16, 32, 16, 4)
    return CUDA_BLOCKS[kernel, 32 if dtype == torch.float32 else 16]


# Forward programs aimed for, per multiprocessor: with few rows (short batches, long vocabularies)
# the vocabulary is split across programs so that every multiprocessor has work.
FWD_PROGRAMS_PER_SM = 8


def multiprocessors(device: torch.device):
    """A CUDA device's multiprocessor count; None elsewhere and in the interpreter. (bench/static_check.py
    replaces it to plan the launches for each target without a GPU.)"""
    if INTERPRETING or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def vocab_splits(n_blocks: int, v_blocks: int, device: torch.device) -> int:
    """How many vocabulary splits the forward uses (the interpreter: 2, to exercise the combine)."""
    sms = multiprocessors(device)
    if sms is None:
        return min(2, v_blocks)
    return max(1, min(v_blocks, -(-FWD_PROGRAMS_PER_SM * sms // n_blocks)))


# The products backward's gradient buffer dL [rows, V] (input dtype): large products, bounded memory.
DLOGITS_BYTES = 256 << 20


def dlogits_rows(vocab: int, itemsize: int, block_n: int) -> int:
    """Rows per chunk of the products backward, a multiple of BLOCK_N (the interpreter: two blocks,
    so that the tests cross chunk boundaries)."""
    if INTERPRETING:
        return 2 * block_n
    return max(block_n, DLOGITS_BYTES // (vocab * itemsize) // block_n * block_n)


def _mode(name: str, choices: tuple) -> str:
    mode = os.environ.get(name, choices[0])
    if mode not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {mode!r}")
    return mode


def backward_mode() -> str:
    """``FASTDPO_BWD``: "products" (default: row chunks of dL + matrix products into an fp32 dW),
    "vocab" (vocabulary slices of dL; each dW slice written once, in the weight dtype) or
    "fused" (one kernel, atomics; gradient filtering)."""
    return _mode("FASTDPO_BWD", ("products", "vocab", "fused"))


def forward_mode() -> str:
    """``FASTDPO_FWD``: "triton" (default: logits never leave the kernel) or "tiles" (cuBLAS products
    on [FWD_TILE_N, FWD_TILE_V] fp32 tiles, each folded by a Triton kernel; bf16/fp16 inputs only)."""
    return _mode("FASTDPO_FWD", ("triton", "tiles"))


def one_pass_mode() -> str:
    """``FASTDPO_ONE_PASS``, for ``linear_dpo_loss`` on the Triton backend when its ``one_pass`` option
    is left at None: "off" (default), "auto" (one pass where whole pairs fit a chunk) or "on" (forced)."""
    return _mode("FASTDPO_ONE_PASS", ("off", "auto", "on"))


# The vocabulary backward's dL [N, width] workspace (input dtype). Besides it the backward holds
# h[rows] [N, D] (input dtype) and the fp32 dH accumulator [N, D]: all independent of V.
VOCAB_SLICE_BYTES = 128 << 20


def vocab_slices(n: int, vocab: int, itemsize: int, block_v: int) -> list:
    """[(v0, v1)]: the vocabulary slices of the vocabulary backward, each a multiple of BLOCK_V wide
    (except the last) and at most max(VOCAB_SLICE_BYTES, n * BLOCK_V * itemsize) of dL. The
    interpreter: two tiles per slice, so that the tests cross slice boundaries."""
    if INTERPRETING:
        width = 2 * block_v
    else:
        budget = int(float(os.environ.get("FASTDPO_SLICE_MB", VOCAB_SLICE_BYTES / 2**20)) * 2**20)
        width = max(block_v, budget // (max(n, 1) * itemsize) // block_v * block_v)
    return [(v0, min(vocab, v0 + width)) for v0 in range(0, vocab, width)]


# The tiles forward: TRL's layout, 4096 tokens x 32768 vocabulary columns, held in fp32 (512 MB).
FWD_TILE_N, FWD_TILE_V = 4096, 32768


def forward_tiles(n: int, vocab: int) -> tuple:
    """([(n0, n1)], [(v0, v1)]): the token and vocabulary tiles of the tiles forward (the interpreter:
    tiles of 24 x 48, so that the tests cross both kinds of boundary)."""
    tn, tv = (24, 48) if INTERPRETING else (FWD_TILE_N, FWD_TILE_V)
    return ([(a, min(n, a + tn)) for a in range(0, n, tn)],
            [(a, min(vocab, a + tv)) for a in range(0, vocab, tv)])


# The one-pass linear_dpo_loss: the fp32 logits [tokens, V] of one chunk of whole pairs.
ONE_PASS_BYTES = 1 << 30


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
