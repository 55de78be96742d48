"""Bad input fails at once with an error naming the argument."""
import pytest
import torch

import fastdpo


def inputs(B=2, T=5, D=8, V=11, dtype=torch.float32):
    return torch.randn(B, T, D, dtype=dtype), torch.randn(V, D, dtype=dtype), torch.randint(0, V, (B, T))


@pytest.mark.parametrize("mutate, error, match", [
    (lambda h, w, y: (h[0], w, y), ValueError, "hidden must have 3 dimensions"),
    (lambda h, w, y: (h, w[:, :-1], y), ValueError, "weight must have shape"),
    (lambda h, w, y: (h, w, y[:, :-1]), ValueError, "labels must have shape"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda h, w, y: (h, w, torch.full_like(y, 11)), ValueError, r"labels must lie in \[0, 11\)"),
    (lambda h, w, y: (h, w, torch.full_like(y, -1)), ValueError, "labels must lie in"),
    (lambda h, w, y: (h.int(), w, y), TypeError, "hidden must be float32"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype torch.float64 must match"),
    (lambda h, w, y: (h[:0], w, y[:0]), ValueError, "hidden is an empty batch"),
    (lambda h, w, y: (h.numpy(), w, y), TypeError, "hidden must be a torch.Tensor"),
    (lambda h, w, y: (h, w, y.tolist()), TypeError, "labels must be a torch.Tensor"),
])
def test_bad_inputs(mutate, error, match):
    with pytest.raises(error, match=match):
        fastdpo.sequence_logps(*mutate(*inputs()))


@pytest.mark.parametrize("kw, error, match", [
    (dict(logit_scale=True), TypeError, "logit_scale must be a real number"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
])
def test_bad_option_types(kw, error, match):
    with pytest.raises(error, match=match):
        fastdpo.sequence_logps(*inputs(), **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(logit_scale=0.0), "logit_scale must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(softcap=0.0), "softcap must be None or"),
    (dict(softcap=float("inf")), "softcap must be None or"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(filter_eps=2.0), "filter_eps must be"),
    (dict(bias=torch.randn(3)), r"bias must have shape \[11\]"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        fastdpo.sequence_logps(*inputs(), **kw)


def test_ignore_index_outside_vocab_is_accepted():
    h, w, y = inputs()
    y[0, :2] = -1
    assert torch.isfinite(fastdpo.sequence_logps(h, w, y, ignore_index=-1)).all()


@pytest.mark.requires_triton
def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    from fastdpo.kernels import config
    monkeypatch.setattr(config, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fastdpo.sequence_logps(*inputs(), backend="triton")


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="backend='triton' supports float32"):
        fastdpo.sequence_logps(*inputs(dtype=torch.float64), backend="triton")


def test_auto_backend_runs_on_cpu():
    h, w, y = inputs()
    torch.testing.assert_close(fastdpo.sequence_logps(h, w, y),
                               fastdpo.sequence_logps(h, w, y, backend="reference"))


@pytest.mark.parametrize("mutate, error, match", [
    (lambda x, y: (x[0], y), ValueError, "logits must have 3 dimensions"),
    (lambda x, y: (x, y[:, 1:]), ValueError, "labels must have shape"),
    (lambda x, y: (x, y + 100), ValueError, "labels must lie in"),
    (lambda x, y: (x[:, :0], y[:, :0]), ValueError, "logits is empty"),
])
def test_bad_logits_inputs(mutate, error, match):
    x, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    with pytest.raises(error, match=match):
        fastdpo.sequence_logps_from_logits(*mutate(x, y))
