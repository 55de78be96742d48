"""linear_dpo_loss: hidden states -> loss, against the reference composed from materialized logits."""
import pytest
import torch
from conftest import DTYPE_IDS, assert_no_worse_than_reference

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


def reference_linear_loss(hidden, weight, labels, ref, **kw):
    logps = R.sequence_logps(hidden, weight, labels)
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


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "sft", "apo_down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("loss_type", [["sigmoid", "hinge"], "ipo", "simpo", "robust", "bco_pair"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap4"])
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
