"""Matrix products of the input dtype accumulated in fp32, outside Triton, and the vocabulary-sliced
schedule of the gradient products that the vocabulary backward and the one-pass loss share."""
import warnings

import torch

_OUT_DTYPE = {}     # (device, "mm" | "addmm") -> whether this torch has the out_dtype overload there


def matmul_f32(a, b, *, out, accumulate=False):
    """out (fp32) = a @ b, or out += a @ b: products of the input dtype accumulated in fp32.

    On CUDA bf16/fp16 operands go to the tensor cores with an fp32 result
    (torch's ``out_dtype``, torch >= 2.8). Older torch on CUDA: the product is
    rounded to the input dtype before it is added (a warning says so). Elsewhere
    the operands are upcast to out's dtype (fp32, or fp64 in the schedule tests), which is exact: the
    same result up to summation order."""
    if a.dtype == torch.float32 or not a.is_cuda:
        if accumulate:
            return out.addmm_(a.to(out.dtype), b.to(out.dtype))
        return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    op = "addmm" if accumulate else "mm"
    if _has_out_dtype(a.device, op):
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if accumulate:
        return out.add_(torch.mm(a, b))
    return out.copy_(torch.mm(a, b))


def matmul_rounded(a, b, *, out, scale=None):
    """out = (a @ b) * scale in out's dtype, accumulated in fp32 and rounded once (scale: a tensor or None).

    On CUDA, 16-bit out and no scale: one product straight into out (cuBLAS accumulates
    16-bit products in fp32, as plain autograd's products do). Otherwise an fp32 result first."""
    if out.dtype in (torch.float32, torch.float64):
        matmul_f32(a, b, out=out)
        return out if scale is None else out.mul_(scale)
    if a.is_cuda and scale is None and out.dtype == a.dtype:
        return torch.mm(a, b, out=out)
    tmp = matmul_f32(a, b, out=torch.empty(out.shape, dtype=torch.float32, device=out.device))
    return out.copy_(tmp if scale is None else tmp.mul_(scale))


def sliced_products(slices, dl_slice, w, hs, *, dh, dw, db, dw_accumulate=False, scale=None):
    """The gradient products, one vocabulary slice (v0, v1) at a time. ``dl_slice(v0, v1)`` returns
    dL[:, v0:v1] [N, v1 - v0] (input dtype) for all N tokens; then

      dh  = sum_s dL_s @ W[v0:v1]                        fp32 [N, D], accumulated over the slices
      dw[v0:v1] = dL_s^T @ hs                            one product over all N tokens, rounded once
                                                         into dw's dtype (dw_accumulate: += into fp32 dw)
      db[v0:v1] += sum_n dL_s                            fp32

    each multiplied by ``scale`` (a tensor; the fp16 backward's 1/unit) where it is given. Any of
    dh, dw, db may be None. Workspace: what dl_slice holds, plus an fp32 [v1 - v0, D] temporary
    only when an fp32 dw is accumulated with a scale."""
    for k, (v0, v1) in enumerate(slices):
        dl = dl_slice(v0, v1)
        if dh is not None:
            matmul_f32(dl, w[v0:v1], out=dh, accumulate=k > 0)                   # [N, D]
        if dw is not None and not dw_accumulate:
            matmul_rounded(dl.t(), hs, out=dw[v0:v1], scale=scale)               # [v1 - v0, D]
        elif dw is not None and scale is None:
            matmul_f32(dl.t(), hs, out=dw[v0:v1], accumulate=True)
        elif dw is not None:
            dw[v0:v1].addcmul_(matmul_f32(dl.t(), hs, out=torch.empty(v1 - v0, hs.shape[1], dtype=dw.dtype,
                                                                       device=hs.device)), scale)
        if db is not None:
            part = dl.sum(0, dtype=db.dtype)
            db[v0:v1] += part if scale is None else part.mul_(scale)
    if dh is not None and scale is not None:
        dh.mul_(scale)


def fp16_unit(g):
    """fp16 only: a power of two with max|unit * g| about 1, as a tensor (no host sync; non-finite g ignored).

    g * (onehot - p) becomes an fp16 product operand. DPO's per-token gradients are ~1e-4, where fp16
    loses bits to underflow: the caller multiplies g by unit and its gradients by 1/unit, exactly.
    bf16 has fp32's exponent range and needs none."""
    return torch.exp2(-torch.floor(torch.log2(
        torch.where(torch.isfinite(g), g.abs(), 0.0).max().clamp(min=2.0 ** -100))))


def _has_out_dtype(device, op: str) -> bool:
    key = (device, op)
    if key not in _OUT_DTYPE:
        x = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(16, 16, dtype=torch.float32, device=device)
        try:
            if op == "addmm":
                torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
            else:
                torch.mm(x, x, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE[key] = True
        except (TypeError, RuntimeError):
            _OUT_DTYPE[key] = False
            warnings.warn(f"torch {torch.__version__} has no {op}(out_dtype=float32) on {device.type}: the "
                          f"backward's gradient products are rounded to the input dtype before their fp32 "
                          f"accumulation (torch >= 2.8 avoids this)")
    return _OUT_DTYPE[key]
