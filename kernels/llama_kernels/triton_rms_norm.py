"""RMSNorm as a Triton kernel: one program per row, float32 accumulation, Meta's rounding.

Same numerics as llama_kernels.fallback.rms_norm: normalise in float32, cast to x's dtype, then scale by the weight.
"""

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 65536  # a whole row lives in registers; Llama's largest is 16384


@triton.jit
def _rms_norm_kernel(
    X,
    W,
    Y,
    stride_x_row,
    stride_y_row,
    stride_w,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31 on long prompts
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Meta's rounding: the normalised row is rounded to x's dtype before the weight multiplies it.
    normed = (x * rstd).to(X.dtype.element_ty)
    w = tl.load(W + cols * stride_w, mask=mask, other=0.0)
    # One float32 product, rounded once to the output dtype, as PyTorch's elementwise multiply does.
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    # Enough threads that each holds a handful of elements of the row (Liger-Kernel's rule).
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x**2, -1) + eps) * weight over the last dimension; any leading shape.

    The output dtype is torch.promote_types(x.dtype, weight.dtype), as in the PyTorch fallback.
    """
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(
            f"rms_norm takes float16, bfloat16 or float32 tensors, got x {x.dtype}, weight {weight.dtype}"
        )
    if x.device != weight.device:
        raise ValueError(
            f"rms_norm: x is on {x.device} but weight is on {weight.device}; move both to one device"
        )
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight of shape {tuple(weight.shape)} must be 1-D with x's last dimension "
            f"(x has shape {tuple(x.shape)})"
        )
    n_cols = x.shape[-1]
    if not 0 < n_cols <= _MAX_HIDDEN:
        raise ValueError(
            f"rms_norm: hidden size {n_cols} is outside 1..{_MAX_HIDDEN}, which this kernel supports"
        )

    x2 = x.reshape(-1, n_cols)  # a view whenever the leading dimensions allow one
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    y2 = out.view(-1, n_cols)
    if x2.shape[0] == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        weight,
        y2,
        x2.stride(0),
        y2.stride(0),
        weight.stride(0),
        n_cols,
        float(eps),
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out
