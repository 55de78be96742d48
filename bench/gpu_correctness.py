"""Correctness of the compiled kernels at full size, where the CPU interpreter never ran (needs CUDA).

    python bench/gpu_correctness.py

For each case, fastdpo.sequence_logps (Triton, bf16 inputs) against float64
ground truth on the same rounded inputs, as tests/test_logps.py does at small
sizes: values and gradients must be no worse than the naive bf16 computation
(fastdpo.reference) plus one bf16 unit roundoff of the truth's largest value.
Every backward is checked: the default (products), and FASTDPO_BWD=fused with
atomics and deterministic; the repeatable ones twice, for bitwise equality.
Prints one line per check; exits 1 if any fails.
"""
from __future__ import annotations

import os
import sys
import time

import torch

import fastdpo
from fastdpo import reference

BF16_TOLERANCE = 2 ** -8      # one bf16 unit roundoff: the TOLERANCE table in tests/conftest.py
CASES = {
    # name: (rows, T, D, V, softcap, bias)
    "llama3 head": (2, 2048, 4096, 128256, None, False),
    "gemma2 head": (2, 2048, 2304, 256000, 30.0, False),
    "odd sizes": (3, 1023, 1000, 50001, None, True),      # multiples of no tile; row 1 fully ignored
}
# (FASTDPO_BWD, deterministic): the default products backward, and the fused kernel's two modes
BACKWARDS = (("products", False), ("fused", False), ("fused", True))


def make_case(rows, T, D, V, bias):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, T, D, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, D, device="cuda", generator=g) * 0.03).bfloat16()
    b = torch.randn(V, device="cuda", generator=g).bfloat16() if bias else None
    labels = torch.randint(0, V, (rows, T), device="cuda", generator=g)
    labels[:, :T // 4] = -100
    if rows > 2:
        labels[1] = -100
    upstream = torch.randn(rows, device="cuda", generator=g, dtype=torch.float64)
    return hidden, weight, b, labels, upstream


def run(fn, hidden, weight, bias, labels, upstream, dtype):
    """(seq logps, dhidden, dweight) in float64 for upstream gradient `upstream`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().to(dtype)
    seq = fn(*leaves, labels, b)
    (seq.double() * upstream).sum().backward()
    return [t.double() for t in (seq.detach(), leaves[0].grad, leaves[1].grad)]


def main() -> int:
    failures = 0
    for name, (rows, T, D, V, softcap, bias) in CASES.items():
        hidden, weight, b, labels, upstream = make_case(rows, T, D, V, bias)
        opts = dict(softcap=softcap)

        def naive(h, w, y, bb):
            return reference.sequence_logps(h, w, y, bias=bb, **opts)

        def fused(deterministic):
            def f(h, w, y, bb):
                return fastdpo.sequence_logps(h, w, y, bias=bb, backend="triton", deterministic=deterministic, **opts)
            return f

        truth = run(naive, hidden, weight, b, labels, upstream, torch.float64)
        same_dtype = run(naive, hidden, weight, b, labels, upstream, torch.bfloat16)
        for bwd, deterministic in BACKWARDS:
            os.environ["FASTDPO_BWD"] = bwd
            mode = f"{bwd}{' deterministic' if deterministic else ''}"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = run(fused(deterministic), hidden, weight, b, labels, upstream, torch.bfloat16)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            for what, a, r, t in zip(("logps", "d hidden", "d weight"), got, same_dtype, truth):
                scale = t.abs().max().item() or 1.0
                err, ref_err = (a - t).abs().max().item(), (r - t).abs().max().item()
                ok = bool(torch.isfinite(a).all()) and err <= ref_err + BF16_TOLERANCE * scale
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name} {mode} {what}: error {err / scale:.2e} of max|truth|, "
                      f"naive bf16 {ref_err / scale:.2e}", flush=True)
            if bwd == "products" or deterministic:
                again = run(fused(deterministic), hidden, weight, b, labels, upstream, torch.bfloat16)
                same = all(torch.equal(x, y) for x, y in zip(got, again))
                failures += not same
                print(f"{'ok  ' if same else 'FAIL'} {name} {mode} twice: bitwise equal = {same}; "
                      f"first call incl. compile {seconds:.1f} s", flush=True)
        os.environ.pop("FASTDPO_BWD")
        del truth, same_dtype
        torch.cuda.empty_cache()
    print(f"gpu_correctness: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
