"""Microbenchmarks of fastdpo.sequence_logps, each named as what it times.

Not part of the test suite (testpaths = ["tests"], --benchmark-disable in addopts); run with

    pytest bench/ --benchmark-enable

Shape: 2 rows × T 512 (N 1024, the first quarter of each row ignored) × D 512 × V 8192,
float32, on CUDA when available. fwd and fwd+bwd keep autograd on (as in training);
bwd times only the backward of a fresh forward.
"""
import pytest
import torch

import fastdpo
from fastdpo import reference

B, T, D, V = 2, 512, 512, 8192
IGNORE_INDEX = -100
BWD_ROUNDS = 5


@pytest.fixture(scope="module")
def inputs():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D, device=device, requires_grad=True)          # [B, T, D]
    weight = (torch.randn(V, D, device=device) * 0.03).requires_grad_()       # [V, D]
    labels = torch.randint(0, V, (B, T), device=device)                       # [B, T]
    labels[:, : T // 4] = IGNORE_INDEX
    grad_seq = torch.randn(B, device=device)                                  # upstream d loss / d logps
    return hidden, weight, labels, grad_seq


def _synced(fn):
    """fn, then wait for the device, so the timer sees the work."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def _fwd_bwd(logps_fn, hidden, weight, labels, grad_seq):
    logps = logps_fn(hidden, weight, labels, ignore_index=IGNORE_INDEX)          # [B]
    return torch.autograd.grad(logps, (hidden, weight), grad_seq)


def test_fwd_fastdpo(benchmark, inputs):
    hidden, weight, labels, _ = inputs
    benchmark(_synced(fastdpo.sequence_logps), hidden, weight, labels, ignore_index=IGNORE_INDEX)


def test_bwd_fastdpo(benchmark, inputs):
    hidden, weight, labels, grad_seq = inputs

    def forward():
        logps = fastdpo.sequence_logps(hidden, weight, labels, ignore_index=IGNORE_INDEX)
        return (logps,), {}

    def backward(logps):
        return torch.autograd.grad(logps, (hidden, weight), grad_seq)

    benchmark.pedantic(_synced(backward), setup=forward, rounds=BWD_ROUNDS, warmup_rounds=1)


def test_fwd_bwd_fastdpo(benchmark, inputs):
    benchmark(_synced(_fwd_bwd), fastdpo.sequence_logps, *inputs)


def test_fwd_bwd_reference(benchmark, inputs):
    benchmark(_synced(_fwd_bwd), reference.sequence_logps, *inputs)
