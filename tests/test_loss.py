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


# ------------------------------------------------------------------------------------ WPO and LD-DPO (TRL's options)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "sft"], ["bco_pair", "simpo"]], ids="+".join)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_weights_match_reference(backend, loss_type):
    """Each pair's loss times its weight, in every term (sft: its batch loss times the mean weight)."""
    tensors, (lc, lr) = make_pairs()
    weights = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=0.05 if "simpo" in loss_type else 0.0,
              chosen_lengths=lc, rejected_lengths=lr, pair_weights=weights)
    want, want_g, _ = loss_and_grads(R.dpo_loss, tensors, torch.float64, **kw)
    dtype = torch.float64 if backend == "torch" else torch.float32
    kw.update(chosen_lengths=lc.to(dtype), rejected_lengths=lr.to(dtype), pair_weights=weights.to(dtype))
    got, got_g, _ = loss_and_grads(L.dpo_loss, tensors, dtype, backend=backend, **kw)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    scale = max(g.abs().max().item() for g in want_g)
    for name, a, b in zip(["pc", "pr", "rc", "rr"], got_g, want_g):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=rtol * scale, msg=name)


def head_batch(B=3, T=11, D=8, V=29, seed=0):
    """hidden [2B, T, D] (requires grad), weight, labels with replies of different lengths, reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, D, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[0, 7:], labels[B + 1, 5:], labels[B + 2, :] = -100, -100, -100     # lengths differ; one reply empty
    ref = torch.randn(2 * B, generator=g, dtype=torch.float64) - 20
    return hidden, weight, labels, ref


HEAD = dict(logit_scale=0.7, softcap=5.0, temperature=0.8)


def test_wpo_weights_match_reference():
    """log p(y) - log sum_v p_v^2 = log p_{T/2}(y) - log p_T(y): two forwards of the fused op, no logits."""
    hidden, weight, labels, _ = head_batch()
    logits = R.logit_transform(hidden.detach() @ weight.T, **HEAD)
    want = R.wpo_weights(logits, labels)
    got = L.wpo_weights(hidden, weight, labels, **HEAD)
    assert not got.requires_grad and (want < 0.5).all()                # far from the trivial weight 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("ld_alpha, use_weighting", [(0.3, False), (None, True), (0.5, True)],
                         ids=["ld_alpha", "use_weighting", "ld_alpha+use_weighting"])
def test_linear_dpo_loss_ld_alpha_and_use_weighting_match_reference(ld_alpha, use_weighting):
    hidden, weight, labels, ref = head_batch()
    kw = dict(loss_type=["sigmoid", "ipo"], beta=0.2)
    loss, metrics = L.linear_dpo_loss(hidden, weight, labels, *ref.chunk(2), ld_alpha=ld_alpha,
                                      use_weighting=use_weighting, **kw, **HEAD)
    grad, = torch.autograd.grad(loss, hidden)
    logits = R.logit_transform(hidden @ weight.T, **HEAD)
    logps, token = R.sequence_logps_from_logits(logits, labels, return_token_logps=True)
    if ld_alpha is not None:
        logps = R.ld_sequence_logps(token, labels, ld_alpha)
    lengths = (labels != -100).sum(1).double()
    want, want_m = R.dpo_loss(*logps.chunk(2), *ref.chunk(2), chosen_lengths=lengths[:3], rejected_lengths=lengths[3:],
                              pair_weights=R.wpo_weights(logits, labels) if use_weighting else None, **kw)
    want_grad, = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12 * want_grad.abs().max().item())
    torch.testing.assert_close(metrics["logps/chosen"], want_m["logps/chosen"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="aot", pair_weights=torch.ones(3)), r"pair_weights: .* \['aot'\]"),
    (dict(loss_type="aot_unpaired", use_weighting=True), r"use_weighting: .* \['aot_unpaired'\]"),
    (dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5), "ld_alpha with loss_type 'sft'"),
    (dict(ld_alpha=-0.1), r"ld_alpha must be None or a number in \[0, 1\]"),
    (dict(use_weighting=True, pair_weights=torch.ones(3)), "use_weighting=True or pair_weights, not both"),
    (dict(ld_alpha=0.5, one_pass=True), "one pass does not apply here: ld_alpha"),
    (dict(use_weighting=True, one_pass=True), r"one pass does not apply here: per-pair weights"),
])
def test_ld_alpha_and_weighting_bad_options(kw, match):
    hidden, weight, labels, ref = head_batch()
    with pytest.raises(ValueError, match=match):
        L.linear_dpo_loss(hidden.float(), weight.float(), labels, *ref.float().chunk(2), **kw)


# ------------------------------------------------------------------------------------ what a caller cannot guess


@pytest.mark.parametrize("backend", BACKENDS)
def test_simpo_metrics_are_trl_cpo_trainers(backend):
    """SimPO as TRL's CPOTrainer (loss_type="simpo"): the loss and its reward metrics both come from the
    length-averaged log-probs; TRL's own cpo_loss computes the expected values."""
    import types
    CPOTrainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    (pc, pr, _, _), (lc, lr) = make_pairs()
    beta, gamma, ls = 0.1, 0.5, 0.05
    trl_self = types.SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=ls, loss_type="simpo",
                                     accelerator=types.SimpleNamespace(device=pc.device))
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl_self, pc / lc, pr / lr)
    dtype = torch.float64 if backend == "torch" else torch.float32
    loss, m = L.dpo_loss(pc.to(dtype), pr.to(dtype), beta=beta, loss_type="simpo", gamma=gamma, label_smoothing=ls,
                         chosen_lengths=lc.to(dtype), rejected_lengths=lr.to(dtype), backend=backend)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    want = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).double().mean(), "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": (pc / lc).mean(), "logps/rejected": (pr / lr).mean()}
    torch.testing.assert_close(loss.double(), losses.mean(), rtol=rtol, atol=0)
    for k, v in want.items():
        tol = 1e-7 if k == "rewards/accuracies" else rtol        # a float32 fraction, as the other losses log it
        torch.testing.assert_close(m[k].double(), v, rtol=tol, atol=tol, msg=k)
    _, want_m = R.dpo_loss(pc, pr, beta=beta, loss_type="simpo", gamma=gamma, label_smoothing=ls,
                           chosen_lengths=lc, rejected_lengths=lr)
    for k, v in want.items():
        tol = 1e-7 if k == "rewards/accuracies" else 1e-12
        torch.testing.assert_close(want_m[k].double(), v, rtol=tol, atol=tol, msg=f"reference {k}")


def test_ref_weight_with_a_biased_policy_head_needs_ref_bias():
    """The reference head is ref_weight with ref_bias: never the policy's bias by default."""
    hidden, weight, labels, _ = head_batch()
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    ref_weight = weight * 0.9
    with pytest.raises(ValueError, match="ref_weight is given and the policy head has a bias: give ref_bias too"):
        L.linear_dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=hidden.detach(), ref_weight=ref_weight)
    zero = torch.zeros_like(bias)
    got, _ = L.linear_dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=hidden.detach(), ref_weight=ref_weight,
                               ref_bias=zero)
    ref = R.sequence_logps_from_logits(hidden.detach() @ ref_weight.T, labels)
    want, _ = L.linear_dpo_loss(hidden, weight, labels, *ref.chunk(2), bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
