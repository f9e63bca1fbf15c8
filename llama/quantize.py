"""Opt-in int8 weight-only quantization: swaps a loaded Transformer's linear layers for int8 ones.

Each output channel (row of a weight) gets one scale, max|row| / 127, computed from the normal checkpoint at
load time; the model then reads half the bytes of bfloat16 per token. The layers keep the model-parallel
communication of the fairscale layers they replace, so a sharded model quantizes rank by rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from llama.moe import MoE
from llama.parallel import ParallelLinear, replace_linear_layers


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) with weight ~= int8 * scale[:, None]; symmetric, -127..127."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for rows in range(0, weight.shape[0], 4096):  # float32 a few rows at a time: no full-size copy
        w = weight[rows : rows + 4096].float()
        # Round the scale to its stored dtype first, so that dividing by it leaves no systematic error.
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(scale_dtype)
        q[rows : rows + 4096] = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        scales[rows : rows + 4096] = s
    return q, scales


class Int8Linear(ParallelLinear):
    """y = x @ (int8 weight * scale)^T for this rank's shard of the weight, no bias (Llama has none).

    scratch: a dict that the model's int8 layers share, where prompts' products keep their conversion buffer.
    """

    def __init__(self, linear: nn.Module, scratch: dict):
        super().__init__(linear)
        weight = linear.weight.detach()
        q, scales = quantize_rows(weight, weight.dtype)
        self.register_buffer("weight", q)  # (out_features_local, in_features_local)
        self.register_buffer("scales", scales)  # (out_features_local,), in the activations' dtype
        self.scratch = scratch

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.scratch)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, scratch: dict) -> torch.Tensor:
    """x @ (weight * scales[:, None])^T for an int8 weight (out_features, in_features)."""
    rows, in_features = x.shape[:-1].numel(), x.shape[-1]
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= 16:
        if rows == 1 and in_features <= 4096 and torch.compiler.is_compiling():
            # Under torch.compile, one fused pass over the int8 rows, which beats ATen's kernel at this size.
            y = (x.float().unsqueeze(-2) * weight.float()).sum(-1) * scales.float()
            return y.to(x.dtype)
        # ATen's int8 kernel (decoding): converts each weight in registers, never writes a bfloat16 copy.
        y = torch._weight_int8pack_mm(x.reshape(rows, in_features), weight, scales)
        return y.view(*x.shape[:-1], -1)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return dequantize_in_blocks_matmul(x, weight, scratch) * scales
    # Elsewhere (CUDA, under torch.compile): dequantize, then one dense matmul (torch.compile fuses the two).
    return F.linear(x, weight.to(x.dtype)) * scales


class Int8Experts(nn.Module):
    """llama/moe.py's Experts with each expert's matrices in int8, one scale per output channel, multiplied as
    Int8Linear multiplies: w1, w3 (E, F, D) and w2 (E, D, F) in nn.Linear's orientation."""

    def __init__(self, experts: nn.Module, scratch: dict):
        super().__init__()
        for name in ("w1", "w2", "w3"):
            weights = getattr(experts, name).detach().mT  # (E, out, in): each expert's matrix as nn.Linear's weight
            q = torch.empty(weights.shape, dtype=torch.int8, device=weights.device)
            scales = torch.empty(weights.shape[:2], dtype=weights.dtype, device=weights.device)
            for e, w in enumerate(weights):  # one expert at a time: no full-size float32 copy
                q[e], scales[e] = quantize_rows(w, w.dtype)
            self.register_buffer(name, q)
            self.register_buffer(name + "_scales", scales)
        self.scratch = scratch

    def forward(self, x_aD: torch.Tensor, e: int) -> torch.Tensor:
        h = F.silu(int8_linear(x_aD, self.w1[e], self.w1_scales[e], self.scratch))
        h = h * int8_linear(x_aD, self.w3[e], self.w3_scales[e], self.scratch)
        return int8_linear(h, self.w2[e], self.w2_scales[e], self.scratch)


SCRATCH_ELEMENTS = 1 << 24  # 32 MB in bfloat16


def dequantize_in_blocks_matmul(x: torch.Tensor, weight: torch.Tensor, scratch: dict) -> torch.Tensor:
    """x @ weight^T on the CPU for an int8 weight, converted to x's dtype a block of rows at a time into one
    buffer per dtype, kept in scratch for the next layer: a fresh tensor the size of the weight costs ten times
    more in page faults than the conversion itself (prompts ran at half the bfloat16 speed that way)."""
    if x.dtype not in scratch:
        scratch[x.dtype] = torch.empty(SCRATCH_ELEMENTS, dtype=x.dtype)
    buffer = scratch[x.dtype]
    rows = max(1, buffer.numel() // weight.shape[1])
    parts = []
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        parts.append(F.linear(x, buffer[: block.numel()].view(block.shape).copy_(block)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every Column/RowParallelLinear of a loaded model (wq, wk, wv, wo, w1, w2, w3, output), and Llama
    4's experts, in place.

    The embedding stays as it is (a lookup reads one row per token). Returns the model.
    """
    scratch: dict = {}  # this model's: freed with it, never shared with another model
    for module in list(model.modules()):  # Llama 4: the experts hold most of the weights
        if isinstance(module, MoE):
            module.experts = Int8Experts(module.experts, scratch)
    return replace_linear_layers(model, lambda linear: Int8Linear(linear, scratch))
