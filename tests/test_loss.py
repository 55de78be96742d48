"""fastdpo.loss: every loss type and f-divergence against the plain formulas, extremes, bad input."""
import pytest
import torch

from fastdpo import loss as L
from fastdpo import reference as R

BACKENDS = ["torch", "triton"]
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.05, "simpo": 0.05}
CASES = [(t, fd) for t in R.LOSS_TYPES
         for fd in (R.F_DIVERGENCES if t in L.F_DIVERGENCE_LOSSES else ("reverse_kl",))]


def make_pairs(B=6, seed=0, spread=3.0):
    """Policy log-probs around -40 and references near them: log-ratios of a few nats."""
    g = torch.Generator().manual_seed(seed)
    pc = torch.randn(B, generator=g, dtype=torch.float64) * 10 - 40
    pr = torch.randn(B, generator=g, dtype=torch.float64) * 10 - 45
    rc = pc - torch.randn(B, generator=g, dtype=torch.float64) * spread
    rr = pr - torch.randn(B, generator=g, dtype=torch.float64) * spread
    lengths = torch.randint(1, 40, (2, B), generator=g).double()
    return [pc, pr, rc, rr], lengths


def loss_and_grads(fn, tensors, dtype, **kw):
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    loss, metrics = fn(*leaves, **kw)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)], metrics


@pytest.mark.parametrize("loss_type, fdiv", CASES, ids=[f"{t}-{f}" for t, f in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_formula(backend, loss_type, fdiv):
    tensors, (lc, lr) = make_pairs()
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0), f_divergence_type=fdiv,
              chosen_lengths=lc, rejected_lengths=lr)
    want, want_g, want_m = loss_and_grads(R.dpo_loss, tensors, torch.float64, **kw)
    dtype = torch.float64 if backend == "torch" else torch.float32   # the kernel computes in fp32
    kw.update(chosen_lengths=lc.to(dtype), rejected_lengths=lr.to(dtype))
    got, got_g, got_m = loss_and_grads(L.dpo_loss, tensors, dtype, backend=backend, **kw)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    scale = max(g.abs().max().item() for g in want_g) or 1.0
    for name, a, b in zip(["pc", "pr", "rc", "rr"], got_g, want_g):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=rtol * scale, msg=name)
    for key in want_m:
        torch.testing.assert_close(got_m[key].double(), want_m[key].double(), rtol=rtol, atol=1e-6, msg=key)
        assert not got_m[key].requires_grad


@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [1e4, -1e4, 0.0], ids=["huge", "huge-negative", "equal"])
def test_extreme_margins_stay_finite(backend, loss_type, margin):
    """|beta * margin| up to 1e4 (and equal log-probs): finite loss and gradients, no overflow."""
    B = 4
    pc = torch.full((B,), -20.0) + margin * 10      # beta 0.1: beta * margin = 1e4
    pr, rc, rr = torch.full((B,), -20.0), torch.full((B,), -20.0), torch.full((B,), -20.0)
    lengths = torch.full((B,), 1.0)
    leaves = [t.requires_grad_() for t in (pc, pr, rc, rr)]
    loss, _ = L.dpo_loss(*leaves, beta=0.1, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0),
                         chosen_lengths=lengths, rejected_lengths=lengths, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    for x in leaves:
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("beta", [1e-4, 0.1, 50.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_large_beta(backend, beta):
    tensors, (lc, lr) = make_pairs()
    kw = dict(beta=beta, loss_type=["sigmoid", "ipo", "hinge"], chosen_lengths=lc, rejected_lengths=lr)
    want, want_g, _ = loss_and_grads(R.dpo_loss, tensors, torch.float64, **kw)
    dtype = torch.float64 if backend == "torch" else torch.float32
    kw.update(chosen_lengths=lc.to(dtype), rejected_lengths=lr.to(dtype))
    got, got_g, _ = loss_and_grads(L.dpo_loss, tensors, dtype, backend=backend, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_weighted_list_is_the_weighted_sum():
    tensors, (lc, lr) = make_pairs()
    kw = dict(chosen_lengths=lc, rejected_lengths=lr)
    combo, _ = L.dpo_loss(*tensors, loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], **kw)
    parts = [L.dpo_loss(*tensors, loss_type=t, **kw)[0] for t in ("sigmoid", "sft")]
    torch.testing.assert_close(combo, 0.8 * parts[0] + 0.2 * parts[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_free_sigmoid_equals_zero_reference(backend):
    tensors, _ = make_pairs()
    free, _ = L.dpo_loss(tensors[0].float(), tensors[1].float(), backend=backend)
    zero, _ = L.dpo_loss(tensors[0].float(), tensors[1].float(), torch.zeros(6), torch.zeros(6), backend=backend)
    torch.testing.assert_close(free, zero)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'; valid: sigmoid, hinge"),
    (dict(f_divergence_type="kl"), "unknown f_divergence_type 'kl'"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "only defined for loss_type"),
    (dict(beta=0.0), "beta must be a finite number > 0"),
    (dict(beta=-1.0), "beta must be"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\) for loss_type 'robust'"),
    (dict(loss_type="exo_pair"), r"\(0, 1\) for loss_type 'exo_pair'"),
    (dict(label_smoothing=0.1), "has no effect on loss_type"),
    (dict(loss_type="ipo"), "needs chosen_lengths and rejected_lengths"),
])
def test_bad_options(kw, match):
    tensors, _ = make_pairs()
    with pytest.raises(ValueError, match=match):
        L.dpo_loss(*tensors, **kw)


def test_bad_shapes_and_missing_reference():
    (pc, pr, rc, rr), _ = make_pairs()
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[6\]"):
        L.dpo_loss(pc, pr, rc[:3], rr)
    with pytest.raises(ValueError, match="give both ref_chosen_logps and ref_rejected_logps"):
        L.dpo_loss(pc, pr, rc, None)
    with pytest.raises(ValueError, match=r"needs ref_chosen_logps and ref_rejected_logps"):
        L.dpo_loss(pc, pr, loss_type="bco_pair")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lable_smoothing'\]"):
        L.linear_dpo_loss(torch.randn(2, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 4)), pc[:1], pr[:1],
                          lable_smoothing=0.1)
    with pytest.raises(ValueError, match="odd row count 3"):
        L.linear_dpo_loss(torch.randn(3, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (3, 4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_logps_get_gradients_in_their_dtype(backend):
    tensors, (lc, lr) = make_pairs()
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in tensors]
    loss, _ = L.dpo_loss(*leaves, loss_type=["sigmoid", "aot"], backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in leaves)


def test_linear_dpo_loss_defaults_are_dpo_loss_defaults():
    import inspect
    signature = inspect.signature(L.dpo_loss).parameters
    assert {k: signature[k].default for k in L.LOSS_DEFAULTS} == L.LOSS_DEFAULTS
