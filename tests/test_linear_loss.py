"""linear_dpo_loss: hidden states -> loss, against the reference composed from materialized logits."""
import numpy as np
import pytest
import torch
from conftest import DTYPE_IDS, assert_no_worse_than_reference, thinned_in_interpreter

from fastdpo import loss as L
from fastdpo import reference as R

BACKENDS = ["torch", "triton"]


def make_batch(B=3, T=23, D=37, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :5] = -100
    labels[B, :] = -100                   # pair 0: its rejected sequence has nothing scored
    ref = torch.randn(2 * B, generator=g, dtype=torch.float64) * 5 - 60
    return hidden, weight, labels, ref


def reference_linear_loss(hidden, weight, labels, ref, logp_kw=None, **kw):
    logps = R.sequence_logps(hidden, weight, labels, **(logp_kw or {}))
    lengths = (labels != -100).sum(1).to(logps.dtype)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    rc, rr = (None, None) if ref is None else ref.chunk(2)
    return R.dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)


def run(fn, hidden, weight, labels, ref, dtype, **kw):
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    loss, metrics = fn(h, w, labels, ref, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


# In the interpreter every pair of backend, dtype and loss type meets: each (dtype, loss type) once, the backend
# alternating. The loss takes float32 log-probs whatever the input dtype, which matters to the log-probs kernels
# and their backward.
DTYPES, LOSSES = [torch.float32, torch.bfloat16, torch.float16], ["sigmoid", "ipo", "simpo", "sft", "apo_down"]
COMPOSITION_CASES = thinned_in_interpreter([(b, d, t) for b in BACKENDS for d in DTYPES for t in LOSSES],
                                           [(BACKENDS[(i + j) % 2], d, t) for i, d in enumerate(DTYPES)
                                            for j, t in enumerate(LOSSES)])


@pytest.mark.parametrize("backend, dtype, loss_type", COMPOSITION_CASES,
                         ids=[f"{b}-{DTYPE_IDS[d]}-{t}" for b, d, t in COMPOSITION_CASES])
def test_matches_reference_composition(backend, dtype, loss_type):
    hidden, weight, labels, ref = make_batch()
    ref = None if loss_type == "simpo" else ref
    kw = dict(beta=0.1, loss_type=loss_type)
    rounded = [t.to(dtype).double() for t in (hidden, weight)]
    truth = run(reference_linear_loss, *rounded, labels, ref, torch.float64, **kw)
    same = run(reference_linear_loss, hidden, weight, labels, ref, dtype, **kw)
    got = run(lambda h, w, y, r, **k: L.linear_dpo_loss(h, w, y, *(r.chunk(2) if r is not None else (None, None)),
                                                        backend=backend, **k),
              hidden, weight, labels, ref, dtype, **kw)
    for name, f, s, t in zip(["loss", "d_hidden", "d_weight"], got[:3], same[:3], truth[:3]):
        assert_no_worse_than_reference(f.reshape(-1), s.reshape(-1), t.reshape(-1), dtype, what=name)
    assert torch.isfinite(got[3]["rewards/margins"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_as_hidden_states(backend):
    hidden, weight, labels, _ = make_batch()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    h, w, rh = hidden.float(), weight.float(), ref_hidden.float()
    ref = R.sequence_logps(rh, w, labels)
    want, _ = L.linear_dpo_loss(h, w, labels, *ref.chunk(2), backend=backend)
    got, _ = L.linear_dpo_loss(h, w, labels, ref_hidden=rh, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_modules_hold_options():
    hidden, weight, labels, ref = make_batch()
    h, w = hidden.float(), weight.float()
    want, _ = L.linear_dpo_loss(h, w, labels, *ref.float().chunk(2), beta=0.3, loss_type="hinge")
    got, _ = L.LinearDPOLoss(beta=0.3, loss_type="hinge")(h, w, labels, *ref.float().chunk(2))
    torch.testing.assert_close(got, want)
    logps = R.sequence_logps(h, w, labels)
    got2, _ = L.DPOLoss(beta=0.3, loss_type="hinge")(*logps.chunk(2), *ref.float().chunk(2))
    torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-6)


# The softcap (a transform of the logits) and the loss type (the coefficient of d logp) are separate parts of
# the one pass: each loss type with one of them, alternating.
ONE_PASS_LOSSES = [(["sigmoid", "hinge"], None), ("ipo", 4.0), ("simpo", None), ("robust", 4.0), ("bco_pair", None)]


@pytest.mark.parametrize("loss_type, softcap", ONE_PASS_LOSSES,
                         ids=[f"{'+'.join(np.atleast_1d(t))}-{'cap4' if c else 'nocap'}" for t, c in ONE_PASS_LOSSES])
def test_one_pass_path_matches_generic(loss_type, softcap, monkeypatch):
    """The chunked path's one-pass loss (no recompute) equals sequence_logps + dpo_loss, over many chunks."""
    from fastdpo import _chunked
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 7 * 101 * 4 * 4)
    hidden, weight, labels, ref = make_batch()
    bias = torch.randn(101, dtype=torch.float64)
    kw = dict(beta=0.2, loss_type=loss_type, softcap=softcap, bias=None, logit_scale=1.3, temperature=0.9,
              label_smoothing=0.1 if loss_type in ("robust", "simpo") else 0.0)
    ref_c, ref_r = (None, None) if loss_type == "simpo" else ref.chunk(2)
    results = []
    for one_pass in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss, metrics = L.linear_dpo_loss(h, w, labels, ref_c, ref_r, **{**kw, "bias": b})
        assert (type(loss.grad_fn).__name__ == "FusedLinearDPOBackward") == (one_pass and loss_type != "bco_pair")
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad, metrics["rewards/margins"]))
        monkeypatch.setattr(L, "tie", lambda *a: None)          # second round: the generic composition
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# Every pair of loss type, softcap and dtype meets: each (loss type, softcap) once, the dtype alternating.
PAIRS_CASES = [(t, c, [torch.float64, torch.float32][(j + k) % 2])
               for j, t in enumerate(["sigmoid", "nca_pair", "apo_zero", ["sigmoid", "ipo"], "simpo", "sppo_hard"])
               for k, c in enumerate([None, 4.0])]


@pytest.mark.parametrize("loss_type, softcap, dtype", PAIRS_CASES,
                         ids=[f"{'+'.join(np.atleast_1d(t))}-{'cap4' if c else 'nocap'}-{DTYPE_IDS[d]}"
                              for t, c, d in PAIRS_CASES])
def test_pairs_one_pass_on_the_cpu_matches_generic(loss_type, softcap, dtype, monkeypatch):
    """The chunked path's one pass over chunks of whole pairs (one or two a chunk: at most 40 scored tokens), any
    per-pair loss (nca_pair, apo_zero, sppo_hard, js_divergence: not tied), with bias, scale, temperature and
    softcap: equal to
    sequence_logps + dpo_loss; a chunk that cannot hold a pair takes the pair-by-pair pass (tied losses) or none."""
    from fastdpo import _chunked, _fused_loss
    V = 101
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 40 * V * torch.finfo(dtype).bits // 8 * (1 if softcap is None else 2))
    kinds = []
    real = _fused_loss._pairs_pass
    monkeypatch.setattr(_fused_loss, "_pairs_pass", lambda *a: kinds.append(a[8]) or real(*a))
    hidden, weight, labels, ref = make_batch()
    bias = torch.randn(V, dtype=torch.float64)
    kw = dict(beta=0.2, loss_type=loss_type, softcap=softcap, logit_scale=1.3, temperature=0.9,
              f_divergence_type="js_divergence" if isinstance(loss_type, list) else "reverse_kl",
              loss_weights=[1.0, 0.4] if isinstance(loss_type, list) else None)
    ref_c, ref_r = (None, None) if loss_type == "simpo" else ref.to(dtype).chunk(2)
    results = []
    for one_pass, dt in (("auto", dtype), (False, dtype), (False, torch.float64)):     # the last: fp64 truth
        h, w, b = (t.to(dtype).to(dt).requires_grad_() for t in (hidden, weight, bias))   # the same inputs
        rc, rr = (None, None) if ref_c is None else (ref_c.to(dt), ref_r.to(dt))
        loss, metrics = L.linear_dpo_loss(h, w, labels, rc, rr, bias=b, one_pass=one_pass, **kw)
        assert (type(loss.grad_fn).__name__ == "FusedLinearDPOBackward") == (one_pass == "auto")
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad, metrics["rewards/margins"]))
    assert kinds == ["torch_pairs"]
    for name, got, generic, truth in zip(["loss", "d_hidden", "d_weight", "d_bias", "margins"], *results):
        if dtype == torch.float64:
            torch.testing.assert_close(got, generic, rtol=1e-9, atol=1e-12)
        else:
            assert_no_worse_than_reference(got.reshape(-1), generic.reshape(-1), truth.reshape(-1), dtype, what=name)
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 20 * V * torch.finfo(dtype).bits // 8)     # 36 tokens do not fit
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    kinds.clear()
    tied = "simpo" if loss_type == "simpo" else "sigmoid"
    loss, _ = L.linear_dpo_loss(h, w, labels, ref_c, ref_r, **{**kw, "loss_weights": None, "loss_type": tied,
                                                                "f_divergence_type": "reverse_kl"})
    assert kinds == [] and type(loss.grad_fn).__name__ == "FusedLinearDPOBackward"     # the tied pass
    if loss_type in ("nca_pair", "apo_zero", "sppo_hard"):
        with pytest.raises(ValueError, match="exceed the chunk budget.*tied to the chosen one"):
            L.linear_dpo_loss(h, w, labels, ref_c, ref_r, one_pass=True, **kw)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.requires_triton)])
def test_one_pass_under_no_grad_forms_no_gradient(backend, monkeypatch):
    """A reference pass or an evaluation (no_grad, parameters that require grad): the same loss and log-probs,
    bitwise, and none of the gradient products."""
    from fastdpo import _chunked
    from fastdpo.kernels import tiles
    one_pass_budget(monkeypatch)
    hidden, weight, labels, ref = make_batch()
    dtype = torch.float64 if backend == "torch" else torch.float32
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    kw = dict(beta=0.1, backend=backend, one_pass=True, return_logps=True)
    loss, _, logps = L.linear_dpo_loss(h, w, labels, *ref.to(dtype).chunk(2), **kw)
    assert type(loss.grad_fn).__name__ == "FusedLinearDPOBackward"
    fail = lambda *a, **k: pytest.fail("a gradient product ran under no_grad")  # noqa: E731
    monkeypatch.setattr(_chunked, "accumulate_chunk", fail)
    monkeypatch.setattr(tiles, "chunk_grads", fail)
    with torch.no_grad():
        loss_ng, _, logps_ng = L.linear_dpo_loss(h, w, labels, *ref.to(dtype).chunk(2), **kw)
    assert torch.equal(loss_ng, loss.detach()) and torch.equal(logps_ng, logps)


# ------------------------------------------------ the one pass on the Triton path (interpreter)

ONE_PASS_CASES = [("sigmoid", torch.float32), ("sigmoid", torch.bfloat16), ("sigmoid", torch.float16),
                  ("ipo", torch.bfloat16), ("nca_pair", torch.bfloat16), ("simpo", torch.bfloat16),
                  (["sigmoid", "bco_pair"], torch.bfloat16)]


def one_pass_budget(monkeypatch, tokens=40, V=101):
    """A chunk of at most `tokens` scored tokens: make_batch's pairs (18 to 36 tokens) one or two a chunk."""
    from fastdpo.kernels import config
    monkeypatch.setattr(config, "ONE_PASS_BYTES", tokens * V * 4)


def triton_one_pass(h, w, y, r, **kw):
    loss, metrics = L.linear_dpo_loss(h, w, y, *(r.chunk(2) if r is not None else (None, None)), backend="triton",
                                      one_pass=True, **kw)
    assert type(loss.grad_fn).__name__ == "FusedLinearDPOBackward"
    return loss, metrics


@pytest.mark.requires_triton
@pytest.mark.parametrize("loss_type,dtype", ONE_PASS_CASES,
                         ids=lambda c: DTYPE_IDS.get(c) if isinstance(c, torch.dtype) else "+".join(np.atleast_1d(c)))
def test_triton_one_pass_matches_reference(loss_type, dtype, monkeypatch):
    """Chunks of whole pairs (pair 0's rejected row fully ignored), any per-pair loss (nca_pair, bco_pair:
    not tied), fp64 ground truth."""
    one_pass_budget(monkeypatch)
    hidden, weight, labels, ref = make_batch()
    ref = None if loss_type == "simpo" else ref
    kw = dict(beta=0.1, loss_type=loss_type, loss_weights=[1.0, 0.5] if isinstance(loss_type, list) else None)
    rounded = [t.to(dtype).double() for t in (hidden, weight)]
    truth = run(reference_linear_loss, *rounded, labels, ref, torch.float64, **kw)
    same = run(reference_linear_loss, hidden, weight, labels, ref, dtype, **kw)
    got = run(triton_one_pass, hidden, weight, labels, ref, dtype, **kw)
    for name, f, s, t in zip(["loss", "d_hidden", "d_weight"], got[:3], same[:3], truth[:3]):
        assert_no_worse_than_reference(f.reshape(-1), s.reshape(-1), t.reshape(-1), dtype, what=name)
    for key in ("logps/chosen", "rewards/margins"):
        torch.testing.assert_close(got[3][key].double(), truth[3][key], rtol=1e-5, atol=1e-4)


@pytest.mark.requires_triton
@pytest.mark.parametrize("requires", [(True, True, True), (True, False, False), (False, True, False),
                                      (False, False, True)], ids=["grad-hwb", "grad-h", "grad-w", "grad-b"])
def test_triton_one_pass_with_bias_softcap_and_each_gradient(requires, monkeypatch):
    one_pass_budget(monkeypatch)
    hidden, weight, labels, ref = make_batch()
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logp_kw = dict(softcap=4.0, logit_scale=1.3, temperature=0.9)
    dtype = torch.bfloat16

    def grads(fn, inputs, dt):
        h, w, b = (t.to(dt).detach().requires_grad_(r) for t, r in zip(inputs, requires))
        loss, _ = fn(h, w, labels, b)
        loss.backward()
        return [loss.detach()] + [t.grad if r else None for t, r in zip((h, w, b), requires)]

    def reference(h, w, y, b):
        return reference_linear_loss(h, w, y, ref, logp_kw={**logp_kw, "bias": b}, beta=0.2)

    def fused(h, w, y, b):
        return triton_one_pass(h, w, y, ref, bias=b, beta=0.2, **logp_kw)

    inputs = (hidden, weight, bias)
    truth = grads(reference, [t.to(dtype).double() for t in inputs], torch.float64)
    same, got = grads(reference, inputs, dtype), grads(fused, inputs, dtype)
    for name, f, s, t in zip(["loss", "d_hidden", "d_weight", "d_bias"], got, same, truth):
        if t is None:
            assert f is None, name
            continue
        assert_no_worse_than_reference(f.reshape(-1), s.reshape(-1), t.reshape(-1), dtype, what=name)


@pytest.mark.requires_triton
def test_triton_one_pass_choice(monkeypatch):
    """Off by default on the Triton path (FASTDPO_ONE_PASS), 'auto' falls back to sequence_logps + dpo_loss
    when a pair does not fit a chunk, one_pass=True then says why, False never takes it."""
    hidden, weight, labels, ref = make_batch()
    h, w, (rc, rr) = hidden.float().requires_grad_(), weight.float().requires_grad_(), ref.float().chunk(2)

    def kind(**kw):
        loss, _ = L.linear_dpo_loss(h, w, labels, rc, rr, backend="triton", **kw)
        return type(loss.grad_fn).__name__

    one_pass_budget(monkeypatch)
    assert kind() == "DPOLossFnBackward"
    assert kind(one_pass="auto") == "FusedLinearDPOBackward"
    assert kind(one_pass=False) == "DPOLossFnBackward"
    monkeypatch.setenv("FASTDPO_ONE_PASS", "auto")
    assert kind() == "FusedLinearDPOBackward"
    assert kind(loss_type="sft") == "DPOLossFnBackward"            # couples the pairs of a batch
    one_pass_budget(monkeypatch, tokens=30)                         # pairs of 36 tokens no longer fit
    assert kind() == "DPOLossFnBackward"
    with pytest.raises(ValueError, match="ONE_PASS_BYTES"):
        kind(one_pass=True)
    with pytest.raises(ValueError, match="one_pass must be"):
        kind(one_pass="yes")
