"""sequence_logps_from_logits: fused log-softmax + gather + masked sum from held logits."""
import pytest
import torch
from conftest import DTYPE_IDS, assert_no_worse_than_reference, thinned_in_interpreter

import fastdpo
from fastdpo import reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(fn, logits, labels, upstream, **kw):
    x = logits.detach().requires_grad_()
    seq, tok = fn(x, labels, return_token_logps=True, **kw)
    ((seq.double() * upstream[0]).sum() + (tok.double() * upstream[1]).sum()).backward()
    return seq, tok, x.grad


# In the interpreter every pair of backend, dtype and softcap meets: each (backend, dtype) once, the softcap
# alternating (the kernel reads the dtype and computes in fp32).
CASES = thinned_in_interpreter([(b, d, c) for b in BACKENDS for d in DTYPES for c in (None, 5.0)],
                               [(b, d, [None, 5.0][(i + j) % 2]) for i, b in enumerate(BACKENDS)
                                for j, d in enumerate(DTYPES)])


@pytest.mark.parametrize("backend, dtype, softcap", CASES,
                         ids=[f"{b}-{DTYPE_IDS[d]}-{'cap5' if c else 'nocap'}" for b, d, c in CASES])
def test_matches_fp64_reference(backend, dtype, softcap, device):
    B, T, V = 3, 29, 173
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :7] = -100
    labels[1] = -100                                              # a sequence with nothing scored
    upstream = (torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    kw = dict(softcap=softcap, temperature=0.9, logit_scale=1.1)
    logits, labels = logits.to(device), labels.to(device)
    upstream = tuple(u.to(device) for u in upstream)

    truth = run(reference.sequence_logps_from_logits, logits.double(), labels, upstream, **kw)
    same = run(reference.sequence_logps_from_logits, logits, labels, upstream, **kw)
    fused = run(fastdpo.sequence_logps_from_logits, logits, labels, upstream, backend=backend, **kw)
    for name, f, s, t in zip(["seq", "token", "d_logits"], fused, same, truth):
        assert_no_worse_than_reference(f, s, t, dtype, what=name)
    seq, _, dx = fused
    assert dx.dtype == dtype and seq.dtype == torch.float32
    assert seq[1].item() == 0.0 and (dx[1] == 0).all() and (dx[:, :7] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_logits(backend, device):
    logits = torch.randn(40, 2, 7, device=device).permute(1, 2, 0)        # [2, 7, 40], strided
    labels = torch.randint(0, 40, (2, 7), device=device)
    torch.testing.assert_close(fastdpo.sequence_logps_from_logits(logits, labels, backend=backend),
                               reference.sequence_logps_from_logits(logits, labels))
