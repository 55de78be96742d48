"""sequence_logps: every backend against float64 ground truth, values and gradients."""
import itertools

import pytest
import torch
from conftest import DTYPE_IDS, assert_no_worse_than_reference, thinned_in_interpreter

import fastdpo
from fastdpo import _chunked, reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, D, V): multiples of no block size
SHAPES = [(2, 47, 31, 123), (3, 19, 70, 257)]
# (bias, softcap, logit_scale, temperature)
OPTIONS = [(False, None, 1.0, 1.0), (True, None, 1.7, 0.6), (False, 4.0, 1.0, 1.0), (True, 3.0, 0.8, 1.3)]


# In the interpreter every pair of dtype, shape and options meets once: each (dtype, options) on one shape,
# alternating. Both shapes end every dimension in a partial tile (the interpreter's BLOCK_N/V/D are 16/32/16) and
# cross the products backward's 32-row chunks.
MATCH_CASES = thinned_in_interpreter([(d, s, o) for d in DTYPES for s in SHAPES for o in OPTIONS],
                                     [(d, SHAPES[(i + j) % 2], o) for i, d in enumerate(DTYPES)
                                      for j, o in enumerate(OPTIONS)])


def option_pair(k):
    """Two of OPTIONS, by parity: (no bias, no softcap) + (bias, softcap), or (bias) + (softcap). Alternated over
    the dtypes, each dtype meets each state of HAS_BIAS and of HAS_SOFTCAP, and each of their four combinations is
    met (the other knobs, scale and temperature, are factors on every path)."""
    return thinned_in_interpreter(OPTIONS, [OPTIONS[0], OPTIONS[3]] if k % 2 == 0 else [OPTIONS[1], OPTIONS[2]])


def shape_id(s):
    return "B{}-T{}-D{}-V{}".format(*s)


def option_id(o):
    bias, softcap, scale, temp = o
    return f"bias{int(bias)}-cap{softcap}-scale{scale}-temp{temp}"


def make_inputs(B, T, D, V, *, bias=False, weight_std=0.3, seed=0, masked_rows=(), device="cpu"):
    """float64 hidden/weight/bias and labels with a prompt prefix and an optional fully-ignored row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * weight_std
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = -100
    for r in masked_rows:
        labels[r] = -100
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(hidden), to(weight), to(b), labels.to(device)


def leaves(tensors, dtype, requires):
    return [None if t is None else t.to(dtype).detach().requires_grad_(r) for t, r in zip(tensors, requires)]


def run(fn, tensors, labels, upstream, **kw):
    """Forward with return_token_logps, backward with random upstream gradients on both outputs."""
    hidden, weight, bias = tensors
    seq, tok = fn(hidden, weight, labels, bias=bias, return_token_logps=True, **kw)
    g_seq, g_tok = upstream
    loss = (seq.double() * g_seq).sum() + (tok.double() * g_tok).sum()
    if loss.requires_grad:
        loss.backward()
    return seq, tok, [None if t is None else t.grad for t in tensors]


def check_against_reference(backend, dtype, shape, options, requires=(True, True, True), masked_rows=(),
                            weight_std=0.3, device="cpu", average=False, **fused_kw):
    """Values and gradients of the fused path against float64 ground truth.

    Values are float32 outputs computed with fp32 accumulation from dtype inputs:
    they must match an fp32-compute reference within the fp32 tolerance. Gradients
    come out in dtype: no worse than the same-dtype reference + that dtype's tolerance.
    """
    bias, softcap, scale, temp = options
    B, T, D, V = shape
    inputs64 = make_inputs(B, T, D, V, bias=bias, masked_rows=masked_rows, weight_std=weight_std, device=device)
    labels = inputs64[3]
    kw = dict(softcap=softcap, logit_scale=scale, temperature=temp, average=average)
    gen = torch.Generator().manual_seed(1)
    upstream = (torch.randn(B, generator=gen, dtype=torch.float64).to(device),
                torch.randn(B, T, generator=gen, dtype=torch.float64).to(device))

    # Ground truth: float64 math on the very inputs the fused path sees (rounded to dtype).
    rounded = [None if t is None else t.to(dtype).double() for t in inputs64[:3]]
    truth = run(reference.sequence_logps, leaves(rounded, torch.float64, requires), labels, upstream, **kw)
    same = run(reference.sequence_logps, leaves(inputs64[:3], dtype, requires), labels, upstream, **kw)
    fp32 = run(reference.sequence_logps, leaves(inputs64[:3], dtype, requires), labels, upstream,
               compute_dtype=torch.float32, **kw)
    fused = run(fastdpo.sequence_logps, leaves(inputs64[:3], dtype, requires), labels, upstream,
                backend=backend, **kw, **fused_kw)

    assert fused[0].dtype == torch.float32
    for name, f, s, t in zip(["seq", "token"], fused[:2], fp32[:2], truth[:2]):
        assert_no_worse_than_reference(f, s, t, torch.float32, what=name)
    for name, f, s, t in zip(["d_hidden", "d_weight", "d_bias"], fused[2], same[2], truth[2]):
        if t is None:
            assert f is None, f"{name}: gradient computed although not required"
            continue
        assert f.dtype == dtype, name
        assert_no_worse_than_reference(f, s, t, dtype, what=name)
    return fused


@pytest.mark.parametrize("dtype, shape, options", MATCH_CASES,
                         ids=[f"{DTYPE_IDS[d]}-{shape_id(s)}-{option_id(o)}" for d, s, o in MATCH_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_reference(backend, dtype, shape, options, device):
    check_against_reference(backend, dtype, shape, options, filter_eps=None, device=device)


@pytest.mark.requires_triton
@pytest.mark.parametrize("dtype, options", [(d, o) for i, d in enumerate(DTYPES) for o in option_pair(i)],
                         ids=lambda c: DTYPE_IDS.get(c) if isinstance(c, torch.dtype) else option_id(c))
def test_fused_backward_matches_fp64_reference(dtype, options, device, monkeypatch):
    """FASTDPO_BWD=fused: the one-kernel backward (atomics) meets the same bounds as the default."""
    monkeypatch.setenv("FASTDPO_BWD", "fused")
    check_against_reference("triton", dtype, SHAPES[1], options, filter_eps=None, device=device)


@pytest.mark.parametrize("requires", [r for r in itertools.product([False, True], repeat=3) if any(r)],
                         ids=lambda r: "grad-" + "".join("hwb"[i] for i in range(3) if r[i]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_requires_grad_combination(backend, requires, device):
    check_against_reference(backend, torch.float32, (2, 13, 20, 45), (True, None, 1.0, 1.0), requires=requires,
                            device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_fully_ignored_sequence_is_exactly_zero(backend, dtype, device):
    seq, tok, (dh, dw, db) = check_against_reference(
        backend, dtype, (3, 17, 24, 50), (True, 2.0, 1.0, 1.0), masked_rows=(1,), device=device)
    assert seq[1].item() == 0.0 and (tok[1] == 0).all()
    assert (dh[1] == 0).all() and (dh[:, : 17 // 4] == 0).all()       # whole row and every prompt position


@pytest.mark.parametrize("backend", BACKENDS)
def test_average_divides_by_scored_tokens(backend, device):
    check_against_reference(backend, torch.float32, (3, 17, 24, 50), (False, None, 1.0, 1.0), masked_rows=(2,),
                            average=True, device=device)


@pytest.mark.parametrize("weight_std", [0.0, 3.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_and_peaked_distributions(backend, dtype, weight_std, device):
    seq, *_ = check_against_reference(backend, dtype, (2, 21, 33, 77), (False, None, 1.0, 1.0),
                                      weight_std=weight_std, device=device)
    if weight_std == 0.0:  # uniform: every scored token has log p = -log V exactly
        scored = torch.tensor([21 - 21 // 4] * 2, dtype=torch.float64)
        torch.testing.assert_close(seq.double().cpu(), -scored * torch.log(torch.tensor(77.0, dtype=torch.float64)),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 5, 64], ids=lambda r: f"chunk{r}")
def test_chunked_path_independent_of_chunk_size(rows, monkeypatch):
    """The PyTorch path processes `rows` valid tokens at a time; any chunking gives the same result."""
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", rows * 123 * 4 * 2)  # two buffers with softcap
    check_against_reference("torch", torch.float32, (2, 47, 31, 123), (True, 3.0, 1.0, 1.0))


HWB, H, WB = (True, True, True), (True, False, False), (False, True, True)
DETERMINISTIC_CASES = thinned_in_interpreter(
    [(m, d, r) for m in ("fused", "products") for d in (torch.float32, torch.bfloat16) for r in (HWB, H, WB)],
    [("fused", torch.float32, HWB), ("fused", torch.bfloat16, HWB), ("fused", torch.float32, H),
     ("fused", torch.bfloat16, WB), ("products", torch.bfloat16, HWB)])


@pytest.mark.requires_triton
@pytest.mark.parametrize("mode, dtype, requires", DETERMINISTIC_CASES,
                         ids=[f"{m}-{DTYPE_IDS[d]}-grad-" + "".join("hwb"[i] for i in range(3) if r[i])
                              for m, d, r in DETERMINISTIC_CASES])
def test_triton_deterministic_mode(dtype, requires, mode, device, monkeypatch):
    """deterministic=True meets the same bound, repeats bitwise, and agrees with the default mode
    (the products backward has no atomics either way and never reads the flag: one case in the interpreter; the
    fused one drops them: its dH launch alone (grad-h), its dW/db launch alone (grad-wb), both (grad-hwb))."""
    monkeypatch.setenv("FASTDPO_BWD", mode)
    args = ("triton", dtype, (2, 40, 33, 100), (True, 3.0, 1.0, 1.0))
    first = check_against_reference(*args, requires=requires, deterministic=True, device=device)
    second = check_against_reference(*args, requires=requires, deterministic=True, device=device)
    atomic = check_against_reference(*args, requires=requires, deterministic=False, device=device)
    for a, b, c in zip(first[2], second[2], atomic[2]):
        if a is not None:
            assert torch.equal(a, b)
            torch.testing.assert_close(a.float(), c.float(), rtol=1e-5, atol=1e-5 * c.abs().max().item())


@pytest.mark.requires_triton
@pytest.mark.parametrize("mode", ["products", "fused"])
@pytest.mark.parametrize("upstream", [1e-4, 1e-5])
def test_small_upstream_gradients_keep_fp16_precision(upstream, mode, device, monkeypatch):
    """DPO's per-token gradients are ~1e-4: the fp16 gradients stay as close to the truth as the truth
    rounded to fp16 (plus one fp16 unit roundoff), however small g is (the naive fp16 path is not)."""
    monkeypatch.setenv("FASTDPO_BWD", mode)
    hidden, weight, _, labels = make_inputs(1, 48, 32, 300, device=device)
    h16, w16 = (t.half().requires_grad_() for t in (hidden, weight))
    (fastdpo.sequence_logps(h16, w16, labels, backend="triton", filter_eps=None) * upstream).sum().backward()
    h64, w64 = (t.half().double().requires_grad_() for t in (hidden, weight))
    (reference.sequence_logps(h64, w64, labels) * upstream).sum().backward()
    for name, got, truth in (("d_hidden", h16.grad, h64.grad), ("d_weight", w16.grad, w64.grad)):
        assert_no_worse_than_reference(got, truth.half(), truth, torch.float16, what=name)


@pytest.mark.requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_gradient_filtering_skips_tiles_within_dtype_tolerance(dtype, device, monkeypatch):
    """filter_eps='auto' skips negligible tiles of the fused backward: on peaked logits the gradients
    change (tiles were skipped) but still meet the bound of the unfiltered kernel. Small tiles, so
    that some are negligible on the GPU too (its default tiles span every row of this batch)."""
    monkeypatch.setenv("FASTDPO_BWD", "fused")
    monkeypatch.setenv("FASTDPO_BLOCKS", "16,32,16,4")
    args = ("triton", dtype, (2, 40, 33, 300), (False, None, 1.0, 1.0))
    filtered = check_against_reference(*args, weight_std=3.0, filter_eps="auto", device=device)
    exact = check_against_reference(*args, weight_std=3.0, filter_eps=None, device=device)
    assert not torch.equal(filtered[2][1], exact[2][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_accepted(backend, device):
    hidden, weight, _, labels = make_inputs(2, 15, 26, 60, device=device)
    h = hidden.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()   # [B, T, D], odd strides
    w = weight.float().t().contiguous().t().requires_grad_()                           # column-major [V, D]
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fastdpo.sequence_logps(h, w, labels.t().contiguous().t(), backend=backend)
    expected = reference.sequence_logps(h_ref, w_ref, labels)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ignore_index", [-1, 7], ids=["ignore-1", "ignore7-in-vocab"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ignore_index(backend, ignore_index, device):
    hidden, weight, _, labels = make_inputs(2, 15, 26, 60, device=device)
    labels[labels == -100] = ignore_index
    out = fastdpo.sequence_logps(hidden.float(), weight.float(), labels, ignore_index=ignore_index, backend=backend)
    expected = reference.sequence_logps(hidden, weight, labels, ignore_index=ignore_index)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_second_order_gradients_are_refused():
    hidden, weight, _, labels = make_inputs(2, 9, 16, 40)
    h = hidden.float().requires_grad_()
    out = fastdpo.sequence_logps(h, weight.float(), labels, backend="torch")
    (g,) = torch.autograd.grad(out.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):   # an error, never a silent wrong value
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_hidden_stays_in_its_sequence(backend, device):
    hidden, weight, _, labels = make_inputs(3, 12, 16, 40, device=device)
    hidden = hidden.float()
    hidden[1, 7, 3] = float("nan")
    labels[1, 7] = 5
    out = fastdpo.sequence_logps(hidden, weight.float(), labels, backend=backend)
    assert torch.isnan(out[1])
    assert torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_accepted(backend, device):
    hidden, weight, _, labels = make_inputs(2, 9, 16, 40, device=device)
    a = fastdpo.sequence_logps(hidden.float(), weight.float(), labels, backend=backend)
    b = fastdpo.sequence_logps(hidden.float(), weight.float(), labels.int(), backend=backend)
    assert torch.equal(a, b)


def test_float64_runs_in_float64_on_torch_backend():
    hidden, weight, bias, labels = make_inputs(2, 9, 16, 40, bias=True)
    out = fastdpo.sequence_logps(hidden, weight, labels, bias=bias, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.sequence_logps(hidden, weight, labels, bias=bias),
                               rtol=1e-12, atol=1e-12)


def test_reference_backend_is_the_reference():
    hidden, weight, _, labels = make_inputs(2, 9, 16, 40)
    assert torch.equal(fastdpo.sequence_logps(hidden, weight, labels, backend="reference"),
                       reference.sequence_logps(hidden, weight, labels))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_with_retained_graph_gives_same_gradients(backend, softcap, monkeypatch, device):
    """The chunked path hands its last forward chunk to the backward and consumes it; a second
    backward (retain_graph=True) must recompute, not reuse it."""
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 7 * 60 * 4 * 2)
    hidden, weight, _, labels = make_inputs(2, 15, 26, 60, device=device)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = fastdpo.sequence_logps(hidden, weight, labels, softcap=softcap, backend=backend)
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, first[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight.grad, first[1], rtol=1e-6, atol=1e-7)


# ------------------------------------------------ the vocabulary backward and the tiles forward (interpreter)

# switches -> environment: FASTDPO_BWD=vocab alone, and with FASTDPO_FWD=tiles (16-bit inputs; fp32 keeps the kernel)
NEW_PATHS = {"vocab": {"FASTDPO_BWD": "vocab"}, "tiles": {"FASTDPO_FWD": "tiles", "FASTDPO_BWD": "vocab"}}


def set_path(monkeypatch, path):
    for name, value in NEW_PATHS[path].items():
        monkeypatch.setenv(name, value)


NEW_PATH_CASES = [(p, d, o) for i, p in enumerate(NEW_PATHS) for j, d in enumerate(DTYPES)
                  if (p, d) != ("tiles", torch.float32) for o in option_pair(i + j)]


@pytest.mark.requires_triton
@pytest.mark.parametrize("path, dtype, options", NEW_PATH_CASES,
                         ids=[f"{p}-{DTYPE_IDS[d]}-{option_id(o)}" for p, d, o in NEW_PATH_CASES])
def test_new_paths_match_fp64_reference(path, dtype, options, device, monkeypatch):
    """Odd sizes (several vocabulary slices and forward tiles, none full), a fully ignored row."""
    set_path(monkeypatch, path)
    seq, tok, (dh, *_) = check_against_reference("triton", dtype, SHAPES[1], options, masked_rows=(1,),
                                                 filter_eps=None, device=device)
    assert seq[1].item() == 0.0 and (dh[1] == 0).all()


@pytest.mark.requires_triton
@pytest.mark.parametrize("requires", [r for r in itertools.product([False, True], repeat=3) if any(r)],
                         ids=lambda r: "grad-" + "".join("hwb"[i] for i in range(3) if r[i]))
def test_new_paths_every_requires_grad_combination(requires, device, monkeypatch):
    set_path(monkeypatch, "tiles")
    check_against_reference("triton", torch.bfloat16, (2, 13, 20, 45), (True, None, 1.0, 1.0), requires=requires,
                            device=device)


@pytest.mark.requires_triton
def test_vocab_backward_repeats_bitwise(device, monkeypatch):
    set_path(monkeypatch, "vocab")
    args = ("triton", torch.bfloat16, (2, 40, 33, 100), (True, 3.0, 1.0, 1.0))
    first = check_against_reference(*args, device=device)
    second = check_against_reference(*args, device=device)
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@pytest.mark.requires_triton
def test_vocab_backward_with_nothing_scored(device, monkeypatch):
    set_path(monkeypatch, "vocab")
    hidden, weight, _, labels = make_inputs(2, 9, 16, 40, device=device)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    fastdpo.sequence_logps(h, w, torch.full_like(labels, -100), backend="triton").sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.requires_triton
@pytest.mark.parametrize("upstream", [1e-4, 1e-5])
def test_vocab_backward_small_upstream_gradients_keep_fp16_precision(upstream, device, monkeypatch):
    test_small_upstream_gradients_keep_fp16_precision(upstream, "vocab", device, monkeypatch)


# ------------------------------------------------ the chunk schedules, at the GPU's sizes, against PyTorch models

def test_vocab_slices_partition_the_vocabulary_within_budget(monkeypatch):
    from fastdpo.kernels import config
    monkeypatch.setattr(config, "INTERPRETING", False)
    for n, V, itemsize in ((12288, 128256, 2), (49152, 128256, 2), (6144, 256000, 2), (7, 50001, 4)):
        slices = config.vocab_slices(n, V, itemsize, 256)
        assert slices[0][0] == 0 and slices[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        width = slices[0][1] - slices[0][0]
        assert n * width * itemsize <= max(config.VOCAB_SLICE_BYTES, n * 256 * itemsize)
        assert width % 256 == 0 or len(slices) == 1


def test_sliced_products_match_unsliced_products(monkeypatch):
    """``sliced_products`` (the vocabulary backward's and the one pass's schedule) with a PyTorch dL,
    float64, slice widths from the GPU's planner: dH, dW, db as one product over the whole vocabulary."""
    from fastdpo.kernels import config
    from fastdpo.kernels._matmul import sliced_products
    monkeypatch.setattr(config, "INTERPRETING", False)
    monkeypatch.setattr(config, "VOCAB_SLICE_BYTES", 37 * 256 * 8 * 3)
    g = torch.Generator().manual_seed(0)
    N, V, D = 37, 2000, 9
    dl, w, hs = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, V), (V, D), (N, D)))
    slices = config.vocab_slices(N, V, 8, 256)
    assert len(slices) == 3
    for accumulate, scale in ((False, None), (True, None), (True, torch.tensor(0.25, dtype=torch.float64))):
        dh = torch.empty(N, D, dtype=torch.float64)
        dw = torch.ones(V, D, dtype=torch.float64) if accumulate else torch.empty(V, D, dtype=torch.float64)
        db = torch.zeros(V, dtype=torch.float64)
        sliced_products(slices, lambda v0, v1: dl[:, v0:v1], w, hs, dh=dh, dw=dw, db=db, dw_accumulate=accumulate,
                        scale=scale)
        k = 1.0 if scale is None else scale.item()
        torch.testing.assert_close(dh, k * dl @ w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, k * dl.t() @ hs + (1.0 if accumulate else 0.0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db, k * dl.sum(0), rtol=1e-12, atol=1e-12)


def test_forward_tiles_combine_to_the_whole_vocabulary(monkeypatch):
    """The tiles forward's schedule with PyTorch folds, float64: per-tile logsumexp and target logit,
    combined (``tiles.combine``), equal log-softmax over the whole vocabulary."""
    from fastdpo.kernels import config
    from fastdpo.kernels.tiles import combine
    monkeypatch.setattr(config, "INTERPRETING", False)
    assert config.forward_tiles(12288, 128256) == ([(0, 4096), (4096, 8192), (8192, 12288)],
                                                  [(0, 32768), (32768, 65536), (65536, 98304), (98304, 128256)])
    monkeypatch.setattr(config, "FWD_TILE_N", 64)
    monkeypatch.setattr(config, "FWD_TILE_V", 96)
    g = torch.Generator().manual_seed(0)
    N, V = 150, 500
    z, y = torch.randn(N, V, generator=g, dtype=torch.float64) * 4, torch.randint(0, V, (N,), generator=g)
    token_tiles, vocab_tiles = config.forward_tiles(N, V)
    lse_k, z_y = torch.empty(2, len(vocab_tiles), N, dtype=torch.float64)
    for n0, n1 in token_tiles:
        for k, (v0, v1) in enumerate(vocab_tiles):
            tile = z[n0:n1, v0:v1]
            lse_k[k, n0:n1] = tile.logsumexp(1)
            inside = (y[n0:n1] >= v0) & (y[n0:n1] < v1)
            z_y[k, n0:n1] = torch.where(inside, tile.gather(1, (y[n0:n1] - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0)
    logp, lse = combine(lse_k, z_y)
    torch.testing.assert_close(lse, z.logsumexp(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp, z.log_softmax(1).gather(1, y[:, None])[:, 0], rtol=1e-12, atol=1e-12)
