"""Correctness of the compiled kernels at full size, where the CPU interpreter never ran (needs CUDA).

    python bench/gpu_correctness.py [--only sequence_logps|one_pass]

For each case, fastdpo (Triton, bf16 inputs) against float64 ground truth on the
same rounded inputs, as the tests do at small sizes: values and gradients must be
no worse than the naive bf16 computation (fastdpo.reference) plus one bf16 unit
roundoff of the truth's largest value. Every path is checked:
  sequence_logps: the default (Triton forward, products backward), FASTDPO_BWD=fused
    with atomics and deterministic, FASTDPO_BWD=vocab, FASTDPO_FWD=tiles + vocab;
  linear_dpo_loss with one_pass=True (chunks of whole pairs; several chunks per case).
The repeatable paths run twice, for bitwise equality. Prints one line per check;
exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import fastdpo
from fastdpo import reference
from fastdpo.loss import linear_dpo_loss

BF16_TOLERANCE = 2 ** -8      # one bf16 unit roundoff: the TOLERANCE table in tests/conftest.py
CASES = {
    # name: (rows, T, D, V, softcap, bias)
    "llama3 head": (2, 2048, 4096, 128256, None, False),
    "gemma2 head": (2, 2048, 2304, 256000, 30.0, False),
    "odd sizes": (3, 1023, 1000, 50001, None, True),      # multiples of no tile; row 1 fully ignored
}
# label: (environment, deterministic, repeatable)
PATHS = {
    "products": ({}, False, True),
    "fused": ({"FASTDPO_BWD": "fused"}, False, False),
    "fused deterministic": ({"FASTDPO_BWD": "fused"}, True, True),
    "vocab": ({"FASTDPO_BWD": "vocab"}, False, True),
    "tiles + vocab": ({"FASTDPO_FWD": "tiles", "FASTDPO_BWD": "vocab"}, False, True),
}
# the one pass: (pairs, T, D, V, softcap, bias); 768 scored tokens a pair at T 512 (several chunks of 1 GiB)
ONE_PASS_CASES = {
    "dpo-short head": (4, 512, 4096, 128256, None, False),
    "gemma2 head": (2, 512, 2304, 256000, 30.0, False),
    "odd sizes": (3, 333, 1000, 50001, None, True),       # pair 1's rejected row fully ignored
}
SWITCHES = ("FASTDPO_FWD", "FASTDPO_BWD", "FASTDPO_ONE_PASS")


def make_case(rows, T, D, V, bias, ignored_row=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, T, D, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, D, device="cuda", generator=g) * 0.03).bfloat16()
    b = torch.randn(V, device="cuda", generator=g).bfloat16() if bias else None
    labels = torch.randint(0, V, (rows, T), device="cuda", generator=g)
    labels[:, :T // 4] = -100
    if ignored_row is not None:
        labels[ignored_row] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype, upstream=None):
    """(values, dhidden, dweight) in float64; values fn(...) (log-probs [B] weighted by `upstream`, or a loss)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().to(dtype)
    out = fn(*leaves, labels, b)
    (out.double() * (1.0 if upstream is None else upstream)).sum().backward()
    return [t.double() for t in (out.detach(), leaves[0].grad, leaves[1].grad)]


def compare(label, got, same_dtype, truth, names) -> int:
    failures = 0
    for what, a, r, t in zip(names, got, same_dtype, truth):
        scale = t.abs().max().item() or 1.0
        err, ref_err = (a - t).abs().max().item(), (r - t).abs().max().item()
        ok = bool(torch.isfinite(a).all()) and err <= ref_err + BF16_TOLERANCE * scale
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label} {what}: error {err / scale:.2e} of max|truth|, "
              f"naive bf16 {ref_err / scale:.2e}", flush=True)
    return failures


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def check_twice(label, first, again, seconds) -> int:
    same = all(torch.equal(x, y) for x, y in zip(first, again))
    print(f"{'ok  ' if same else 'FAIL'} {label} twice: bitwise equal = {same}; first call incl. compile "
          f"{seconds:.1f} s", flush=True)
    return not same


def set_switches(env: dict) -> None:
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)


def check_sequence_logps() -> int:
    failures = 0
    for name, (rows, T, D, V, softcap, bias) in CASES.items():
        hidden, weight, b, labels = make_case(rows, T, D, V, bias, ignored_row=1 if rows > 2 else None)
        upstream = torch.randn(rows, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1),
                               dtype=torch.float64)

        def naive(h, w, y, bb):
            return reference.sequence_logps(h, w, y, bias=bb, softcap=softcap)

        truth = run(naive, hidden, weight, b, labels, torch.float64, upstream)
        same_dtype = run(naive, hidden, weight, b, labels, torch.bfloat16, upstream)
        for label, (env, deterministic, repeatable) in PATHS.items():
            set_switches(env)

            def fused(h, w, y, bb):
                return fastdpo.sequence_logps(h, w, y, bias=bb, backend="triton", deterministic=deterministic,
                                              softcap=softcap)

            got, seconds = timed(lambda: run(fused, hidden, weight, b, labels, torch.bfloat16, upstream))
            failures += compare(f"{name} {label}", got, same_dtype, truth, ("logps", "d hidden", "d weight"))
            if repeatable:
                again = run(fused, hidden, weight, b, labels, torch.bfloat16, upstream)
                failures += check_twice(f"{name} {label}", got, again, seconds)
        set_switches({})
        del truth, same_dtype
        torch.cuda.empty_cache()
    return failures


def check_one_pass() -> int:
    failures = 0
    for name, (pairs, T, D, V, softcap, bias) in ONE_PASS_CASES.items():
        hidden, weight, b, labels = make_case(2 * pairs, T, D, V, bias, ignored_row=pairs + 1 if bias else None)
        ref = torch.randn(2, pairs, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) * 10

        def naive(h, w, y, bb):
            logps = reference.sequence_logps(h, w, y, bias=bb, softcap=softcap)
            pc, pr = logps.chunk(2)
            return reference.dpo_loss(pc, pr, ref[0].to(logps.dtype), ref[1].to(logps.dtype), beta=0.1)[0]

        def one_pass(h, w, y, bb):
            return linear_dpo_loss(h, w, y, ref[0], ref[1], beta=0.1, bias=bb, softcap=softcap, backend="triton",
                                   one_pass=True)[0]

        truth = run(naive, hidden, weight, b, labels, torch.float64)
        same_dtype = run(naive, hidden, weight, b, labels, torch.bfloat16)
        got, seconds = timed(lambda: run(one_pass, hidden, weight, b, labels, torch.bfloat16))
        label = f"one pass {name}"
        failures += compare(label, got, same_dtype, truth, ("loss", "d hidden", "d weight"))
        failures += check_twice(label, got, run(one_pass, hidden, weight, b, labels, torch.bfloat16), seconds)
        del truth, same_dtype
        torch.cuda.empty_cache()
    return failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("sequence_logps", "one_pass"))
    args = p.parse_args()
    failures = 0
    if args.only in (None, "sequence_logps"):
        failures += check_sequence_logps()
    if args.only in (None, "one_pass"):
        failures += check_one_pass()
    print(f"gpu_correctness: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
