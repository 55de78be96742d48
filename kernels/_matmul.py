"""Matrix products of the input dtype accumulated in fp32, outside Triton: the products backward's two GEMMs."""
import warnings

import torch

_OUT_DTYPE = {}     # (device, "mm" | "addmm") -> whether this torch has the out_dtype overload there


def matmul_f32(a, b, *, out, accumulate=False):
    """out (fp32) = a @ b, or out += a @ b: products of the input dtype accumulated in fp32.

    On CUDA bf16/fp16 operands go to the tensor cores with an fp32 result
    (torch's ``out_dtype``, torch >= 2.8). Older torch on CUDA: the product is
    rounded to the input dtype before it is added (a warning says so). Elsewhere
    the operands are upcast, which is exact: the same result up to summation order."""
    if a.dtype == torch.float32 or not a.is_cuda:
        if accumulate:
            return out.addmm_(a.float(), b.float())
        return torch.mm(a.float(), b.float(), out=out)
    op = "addmm" if accumulate else "mm"
    if _has_out_dtype(a.device, op):
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if accumulate:
        return out.add_(torch.mm(a, b))
    return out.copy_(torch.mm(a, b))


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
