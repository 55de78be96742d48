"""Jit helpers shared by the kernels: the logit transform and the mixed-precision dot."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: portable across Triton versions and the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def transform(l, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(l * scale / softcap) * inv_temp (no tanh without softcap)."""
    l = l * scale
    if HAS_SOFTCAP:
        l = softcap * tanh(l / softcap)
    return l * inv_temp


@triton.jit
def softcap_slope(z, softcap, inv_temp):
    """k = (dz/dl) / (scale * inv_temp) = 1 - tanh^2, with tanh = z / (softcap * inv_temp)."""
    t = z / (softcap * inv_temp)
    return 1.0 - t * t


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: the interpreter's bf16 workaround."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
