"""The static GPU check (bench/static_check.py) on the default paths: every Triton specialization the
launchers produce for them compiles for sm_80 and sm_90 without a register spill and within the target's
shared memory. No GPU needed: 130 compilations, about 2 minutes of CPU (5.5 min of wall time with a cold Triton
cache on a shared 2-core machine, seconds with a warm one)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.requires_cuda_compiler
def test_default_paths_compile_for_sm80_and_sm90_without_spills():
    # conftest sets TRITON_INTERPRET=1, under which Triton compiles nothing: the check runs without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "static_check.py")], env=env,
                         capture_output=True, text=True, timeout=1500)
    summary = run.stdout.strip().splitlines()[-1:] or [run.stderr[-2000:]]
    assert run.returncode == 0, f"static check failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " 0 failing" in summary[0], summary


def test_blocks_override_applies_to_16_bit_inputs_only(monkeypatch):
    """FASTDPO_BLOCKS tunes the tensor-core (bf16/fp16) tiles; fp32 keeps its own, which the static check covers."""
    from fastdpo.kernels.config import Blocks, linear_blocks
    cpu = torch.device("cpu")
    fp32 = {k: linear_blocks(torch.float32, cpu, k) for k in ("forward", "dlogits", "fused")}
    monkeypatch.setenv("FASTDPO_BLOCKS", "64,64,32,4,2")
    for kernel in ("forward", "dlogits", "fused"):
        assert linear_blocks(torch.bfloat16, cpu, kernel) == Blocks(64, 64, 32, 4, 2)
        assert linear_blocks(torch.float16, cpu, kernel) == Blocks(64, 64, 32, 4, 2)
        assert linear_blocks(torch.float32, cpu, kernel) == fp32[kernel]
