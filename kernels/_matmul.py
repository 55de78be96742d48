"""Matrix products of the input dtype accumulated in fp32, outside Triton: the products backward's two GEMMs."""
import torch

_OUT_DTYPE_MM = {}


def matmul_f32(a, b, *, out, accumulate=False):
    """out (fp32) = a @ b, or out += a @ b: products of the input dtype accumulated in fp32.

    On CUDA bf16/fp16 operands go to the tensor cores with an fp32 result
    (torch's ``out_dtype``); elsewhere (and if this torch lacks it) the
    operands are upcast, which is exact, so the result is the same up to
    summation order."""
    if a.dtype != torch.float32 and a.is_cuda and _has_out_dtype_mm(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return out
    if accumulate:
        return out.addmm_(a.float(), b.float())
    return torch.mm(a.float(), b.float(), out=out)


def _has_out_dtype_mm(device) -> bool:
    if device not in _OUT_DTYPE_MM:
        x = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(16, 16, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
            torch.mm(x, x, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_MM[device] = True
        except (TypeError, RuntimeError):
            _OUT_DTYPE_MM[device] = False
    return _OUT_DTYPE_MM[device]
