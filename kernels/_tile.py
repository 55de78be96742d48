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


@triton.jit
def online_lse_step(m, s, z_y, z, offs_v, y):
    """One vocabulary tile z [BN, BV] of the online logsumexp and the target pick:
    m' = max(m, max_v z); s = s * exp(m - m') + sum_v exp(z - m'); z_y += z[y] if y in the tile."""
    m_new = tl.maximum(m, tl.max(z, 1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
    z_y += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1)
    return m_new, s, z_y


@triton.jit
def rtne_bf16(x):
    """x (fp32) rounded to the nearest bf16 value, kept in fp32: the GPU's fp32 -> bf16 cast.

    The interpreter truncates in that cast; UPCAST kernels use this instead."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_dot_operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x cast to the input dtype for a tensor-core product (UPCAST: rounded, kept fp32)."""
    if UPCAST:
        return rtne_bf16(x)
    return x.to(dtype)
