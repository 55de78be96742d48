"""Test configuration: the Triton interpreter, the tolerance table, platform skips."""
import os

# Must happen before anything imports triton: the kernels then run on the CPU.
if os.environ.get("FASTDPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: a hub lookup fails at once instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: F401,E402
    HAS_TRITON = True
except ImportError:  # e.g. macOS: the chunked PyTorch path is still tested
    HAS_TRITON = False



def cuda_compiler_missing():
    """Why Triton cannot compile for CUDA on this machine (no CUDA backend, or its wheel's ptxas or
    cuobjdump does not run), or None. No GPU is needed to compile."""
    if not HAS_TRITON:
        return "triton is not installed"
    import subprocess
    from triton.backends import backends
    if "nvidia" not in backends:
        return "Triton has no CUDA backend here"
    from triton import knobs
    for tool in ("ptxas", "cuobjdump"):
        try:
            subprocess.run([getattr(knobs.nvidia, tool).path, "--version"], check=True, capture_output=True,
                           timeout=60)
        except Exception as e:  # noqa: BLE001 (any failure: the tool cannot run here)
            return f"{tool} from Triton's wheel does not run: {e}"
    return None


DEVICE = "cuda" if os.environ.get("FASTDPO_TEST_CUDA") == "1" else "cpu"

# Allowed excess error of a fused path over the same-dtype reference, relative
# to the largest magnitude of the float64 ground truth. One table; never
# loosened inline (STYLE 7).
TOLERANCE = {
    torch.float32: 1e-6,
    torch.bfloat16: 2 ** -8,   # one bf16 unit roundoff
    torch.float16: 2 ** -11,   # one fp16 unit roundoff
    torch.float64: 1e-12,
}

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_triton: runs Triton kernels (interpreter or CUDA)")
    config.addinivalue_line("markers", "requires_cuda_compiler: compiles with Triton's CUDA backend and ptxas")
    config.addinivalue_line("markers", "slow: multi-process launches (tens of seconds each); CI runs them")


def pytest_collection_modifyitems(config, items):
    """Without Triton, skip what runs its kernels: the requires_triton tests and backend='triton' cases;
    without Triton's CUDA compiler, the requires_cuda_compiler tests."""
    compiling = [item for item in items if "requires_cuda_compiler" in item.keywords]
    why = cuda_compiler_missing() if compiling else None
    for item in compiling if why else ():
        item.add_marker(pytest.mark.skip(reason=why))
    if HAS_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        params = getattr(item, "callspec", None)
        if "requires_triton" in item.keywords or (params is not None and params.params.get("backend") == "triton"):
            item.add_marker(skip)


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return (actual.double() - truth).abs().max().item()


def assert_no_worse_than_reference(actual, same_dtype_ref, truth, dtype, what=""):
    """|actual - truth| <= |same_dtype_ref - truth| + TOLERANCE[dtype] * max|truth| (max over entries)."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = truth.abs().max().item() or 1.0
    err, ref_err = max_error(actual, truth), max_error(same_dtype_ref, truth)
    bound = ref_err + TOLERANCE[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3e} > reference error {ref_err:.3e} + tol*scale ({bound:.3e})"


@pytest.fixture
def device():
    return DEVICE


def thinned_in_interpreter(every, thinned):
    """Parametrize cases: every combination on CUDA (FASTDPO_TEST_CUDA=1, where they take seconds); in the Triton
    interpreter, where each takes seconds, the thinned list, in which every pair of values still meets."""
    return every if DEVICE == "cuda" else thinned

# Hugging Face models through the fused head vs the plain logits path, fp32: relative to the largest magnitude of
# each compared tensor (log-probs, every parameter's gradient).
MODEL_RTOL = 1e-5
# A parameter whose gradient is mathematically 0 (a key bias under the softmax) carries only rounding residue:
# it is compared on GRAD_FLOOR times the model's largest gradient instead of its own (zero) scale.
GRAD_FLOOR = 1e-3
