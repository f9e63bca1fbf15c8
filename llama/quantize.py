"""Opt-in weight-only quantization (Llama.build's quantize="int8" or "int4"): swaps a Transformer's linear layers
and Llama 4's experts for int8 or int4 ones; the embedding stays. docs/quantization.md has the figures.

int8: one scale per output channel (row of a weight), max|row| / 127: half the bytes of bfloat16 per token. int4:
groups of input features, 16 levels between each group's min and max: about a quarter. Weights are quantized
from the normal checkpoint, each as it is read when Llama.build loads (llama/checkpoint.py), or from a loaded
model. The layers keep the model-parallel communication of the fairscale layers they replace, so a sharded model
quantizes rank by rank.
"""

import functools
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama.moe import MoE
from llama.parallel import ParallelLinear, replace_linear_layers

# Quantizing, packing and dequantizing go a slice of rows at a time, so that their float32 temporaries stay small
# beside the weight (quantizing while loading holds one floating-point weight at a time, and no more).
ELEMENTS_AT_ONCE = 1 << 20


def rows_at_once(in_features: int) -> int:
    """Rows of a weight to take at a time: a multiple of 64 (the CPU int4 layout's blocks of rows)."""
    return max(64, ELEMENTS_AT_ONCE // in_features // 64 * 64)


def quantize_rows(
    weight: torch.Tensor, scale_dtype: torch.dtype, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) with weight ~= int8 * scale[:, None]; symmetric, -127..127. out: the two
    tensors to write them into (on any device)."""
    if out is None:
        out = (
            torch.empty(weight.shape, dtype=torch.int8, device=weight.device),
            torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device),
        )
    q, scales = out
    step = rows_at_once(weight.shape[1])
    for rows in range(0, weight.shape[0], step):  # float32 a few rows at a time: no full-size copy
        w = weight[rows : rows + step].to(torch.float32, copy=True)  # a copy, worked on in place
        # Round the scale to its stored dtype first, so that dividing by it leaves no systematic error.
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(scale_dtype)
        q[rows : rows + step] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[rows : rows + step] = s
    return q, scales


class Int8Linear(ParallelLinear):
    """y = x @ (int8 weight * scale)^T for this rank's shard of the weight, no bias (Llama has none).

    scratch: a dict that the model's int8 layers share, where prompts' products keep their conversion buffer.
    """

    def __init__(
        self,
        linear: nn.Module,
        scratch: dict,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(linear)
        weight = linear.weight.detach()
        device, dtype = torch.device(device or weight.device), dtype or weight.dtype
        if weight.device.type == "meta":  # a skeleton, which load_state_dict fills
            q = torch.empty(weight.shape, dtype=torch.int8, device=device)
            scales = torch.empty(weight.shape[0], dtype=dtype, device=device)
        else:
            q, scales = (t.to(device) for t in quantize_rows(weight, dtype))
        self.register_buffer("weight", q)  # (out_features_local, in_features_local)
        self.register_buffer("scales", scales)  # (out_features_local,), in the activations' dtype
        self.scratch = scratch

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point() and weight.shape == self.weight.shape:
            quantize_rows(weight, self.scales.dtype, out=(self.weight, self.scales))  # Meta's weight, as it is read
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

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

    def __init__(
        self,
        experts: nn.Module,
        scratch: dict,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        for name in ("w1", "w2", "w3"):
            weights = getattr(experts, name).detach().mT  # (E, out, in): each expert's matrix as nn.Linear's weight
            where, what = torch.device(device or weights.device), dtype or weights.dtype
            q = torch.empty(weights.shape, dtype=torch.int8, device=where)
            scales = torch.empty(weights.shape[:2], dtype=what, device=where)
            if weights.device.type != "meta":  # else a skeleton, which load_state_dict fills
                self.quantize_(q, scales, weights)
            self.register_buffer(name, q)
            self.register_buffer(name + "_scales", scales)
        self.scratch = scratch

    @staticmethod
    def quantize_(q: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor) -> None:
        for e, w in enumerate(weights):  # one expert at a time: no full-size float32 copy
            quantize_rows(w, scales.dtype, out=(q[e], scales[e]))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        state_dict, filled = dict(state_dict), set()
        for name in ("w1", "w2", "w3"):
            weights = state_dict.get(prefix + name)
            if weights is not None and weights.is_floating_point() and weights.mT.shape == getattr(self, name).shape:
                # Meta's (E, in, out), quantized as it is read
                self.quantize_(getattr(self, name), getattr(self, name + "_scales"), weights.mT)
                del state_dict[prefix + name]
                filled |= {prefix + name, prefix + name + "_scales"}
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing_keys = args[2]
        missing_keys[:] = [k for k in missing_keys if k not in filled]

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


def quantize_int8(
    model: nn.Module, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Replace every Column/RowParallelLinear of a model (wq, wk, wv, wo, w1, w2, w3, output), and Llama 4's
    experts, in place. The embedding stays as it is (a lookup reads one row per token). Returns the model.

    device, dtype: where the int8 weights go and the activations' dtype (default: the weights'); a model on the
    meta device becomes an int8 skeleton there that load_state_dict fills, from Meta's weights (quantized as
    they are read) or from a saved int8 state dict.
    """
    scratch: dict = {}  # this model's: freed with it, never shared with another model
    for module in list(model.modules()):  # Llama 4: the experts hold most of the weights
        if isinstance(module, MoE):
            module.experts = Int8Experts(module.experts, scratch, device, dtype)
    return replace_linear_layers(model, lambda linear: Int8Linear(linear, scratch, device, dtype))


# -- int4 -------------------------------------------------------------------------------------------------------------
#
# Weight-only, group-wise along the input dimension, asymmetric: each group of group_size weights of a row gets a
# bfloat16 scale and zero, w ~= (q - 8) * scale + zero with q in 0..15, the form PyTorch's int4 products take.
# The products are ATen's: torch.ops.aten._weight_int4pack_mm_for_cpu on a CPU (torch 2.6+), _weight_int4pack_mm
# on CUDA (bfloat16, compute capability 8.0+); elsewhere a plain dequantize-then-multiply path, int4_plain_linear,
# which the tests hold the kernels to. The kernels read the weight in a layout of their own, so the state dict
# holds a portable one instead: "weight" uint8 (out, in / 2), two values a byte, the even input feature in the high
# half (the layout _convert_weight_to_int4pack takes on CUDA), "scales" and "zeros" bfloat16 (out, in / group_size).

GROUP_SIZES = (32, 64, 128, 256)  # what ATen's int4 products take
DEFAULT_GROUP_SIZE = 128


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (out, in) in 0..15, scales, zeros bfloat16 (out, in / group_size)) with
    weight ~= (q - 8) * scale + zero within each group: the group's min..max over 16 levels."""
    out_features, in_features = weight.shape
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, in_features // group_size, dtype=torch.bfloat16, device=weight.device)
    zeros = torch.empty_like(scales)
    step = rows_at_once(in_features)
    for rows in range(0, out_features, step):  # float32 a slice at a time: no full-size copy
        w = weight[rows : rows + step].to(torch.float32, copy=True)  # a copy, worked on in place
        w = w.unflatten(1, (-1, group_size))  # (rows, groups, group_size)
        low, high = w.amin(dim=2), w.amax(dim=2)
        # Scale and zero rounded to their stored dtype first, so that q is chosen against the values used.
        s = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16)
        z = (low + 8 * s.float()).to(torch.bfloat16)
        levels = w.sub_(z.float()[..., None]).div_(s.float()[..., None]).round_().add_(8)  # in place
        q[rows : rows + step] = levels.clamp_(0, 15).to(torch.uint8).flatten(1)
        scales[rows : rows + step], zeros[rows : rows + step] = s, z
    return q, scales, zeros


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> the portable uint8 (out, in / 2): even input feature high, odd low."""
    return q[:, 0::2] << 4 | q[:, 1::2]


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight (out, in) in dtype from the portable uint8 (out, in / 2) and ATen's (groups, out, 2)."""
    scales, zeros = scales_and_zeros.float().permute(2, 1, 0)[:, :, :, None]  # each (out, groups, 1)
    q = unpack_pairs(packed).unflatten(1, (scales.shape[1], -1))
    return ((q.float() - 8) * scales + zeros).flatten(1).to(dtype)


def int4_plain_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with the weight dequantized from the portable layout a slice of rows at a time, each slice
    multiplied in x's dtype: the reference for the kernels, and the product where there is none."""
    parts = []
    step = rows_at_once(packed.shape[1] * 2)
    for rows in range(0, packed.shape[0], step):
        w = dequantize_int4(packed[rows : rows + step], scales_and_zeros[:, rows : rows + step], x.dtype)
        parts.append(F.linear(x, w))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# The CPU kernel's layout: blocks of block_n rows (64 with AVX-512, 32 otherwise), each stored as (in, block_n / 2)
# bytes; in a full block on AVX-512 and AVX2, byte d holds rows d (low half) and d + block_n / 2 (high half), in
# other blocks rows 2d (low) and 2d + 1 (high). Which one this build uses is found once, by unpacking a probe.
CPU_LAYOUTS = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"), (64, "pairs"))


def unpack_cpu_layout(packed: torch.Tensor, in_features: int, block_n: int, kind: str) -> torch.Tensor:
    """ATen's CPU int4 layout (out, in / 2) -> values (out, in) 0..15, for one of CPU_LAYOUTS."""
    out_features, flat = packed.shape[0], packed.reshape(-1)
    q = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    for start in range(0, out_features, block_n):
        n = min(block_n, out_features - start)
        block = flat[start * in_features // 2 : (start + n) * in_features // 2].view(in_features, n // 2)
        low, high = block & 15, block >> 4
        if kind == "halves" and n == block_n:
            rows = torch.cat([low, high], dim=1)  # (in, n)
        else:
            rows = torch.stack([low, high], dim=-1).flatten(1)
        q[start : start + n] = rows.T
    return q


@functools.cache
def cpu_layout() -> Optional[tuple[int, str]]:
    """The layout ATen's CPU int4 packing uses in this process, or None if it is none of CPU_LAYOUTS (the CPU then
    takes the plain path: a model it could not save is no use)."""
    probe = torch.randint(0, 16, (208, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block_n, kind in CPU_LAYOUTS:
        if torch.equal(unpack_cpu_layout(packed, 8, block_n, kind), probe.to(torch.uint8)):
            return block_n, kind
    return None


def int4_kernel(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
    """Which of ATen's int4 products serves a weight (out, in) with activations of dtype on device: "cpu",
    "cuda", or None (the plain path)."""
    if device.type == "cpu":
        return "cpu" if out_features % 16 == 0 and cpu_layout() is not None else None
    if device.type == "cuda":  # not run in this project's CI: no GPU there
        ok = dtype == torch.bfloat16 and out_features % 8 == 0 and in_features % 32 == 0
        return "cuda" if ok and torch.cuda.get_device_capability(device) >= (8, 0) else None
    return None


def inner_k_tiles(in_features: int) -> int:
    return 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2


def pack_for(kernel: Optional[str], q: torch.Tensor) -> torch.Tensor:
    """Values (out, in) 0..15 -> the layout kernel reads (the portable one for the plain path)."""
    if kernel == "cpu":
        packed = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8, device=q.device)
        step = rows_at_once(q.shape[1])
        for rows in range(0, q.shape[0], step):  # the layout's blocks of rows never cross a slice
            packed[rows : rows + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q[rows : rows + step].to(torch.int32), 1
            )
        return packed
    if kernel == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(pack_pairs(q), inner_k_tiles(q.shape[1]))
    return pack_pairs(q)


def unpack_from(kernel: Optional[str], packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """The portable uint8 (out, in / 2) of a weight packed for kernel."""
    if kernel == "cpu":
        return pack_pairs(unpack_cpu_layout(packed, in_features, *cpu_layout()))
    if kernel == "cuda":
        # The tiled CUDA layout read back through the product itself: rows of the identity, with every scale 1
        # and zero 8, give the stored values exactly.
        out_features = packed.shape[0] * 8
        ones = torch.ones(in_features // group_size, out_features, dtype=torch.bfloat16, device=packed.device)
        unit = torch.stack([ones, 8 * ones], dim=-1)
        q = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
        eye = torch.eye(in_features, dtype=torch.bfloat16, device=packed.device)
        for k in range(0, in_features, 1024):
            q[:, k : k + 1024] = torch.ops.aten._weight_int4pack_mm(eye[k : k + 1024], packed, group_size, unit).T.to(
                torch.uint8
            )
        return pack_pairs(q)
    return packed


def int4_linear(
    x: torch.Tensor, kernel: Optional[str], packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x @ weight^T for an int4 weight packed for kernel, scales_and_zeros (groups, out, 2) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if kernel == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, scales_and_zeros)
    elif kernel == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, group_size, scales_and_zeros)
    else:
        y = int4_plain_linear(x2, packed, scales_and_zeros)
    return y.view(*x.shape[:-1], -1)


def choose_group_size(group_size: Optional[int], in_features: int, name: str) -> int:
    """group_size itself if it divides in_features (this rank's share of a layer's input features: groups never
    straddle shards); None: the largest of 128, 64 and 32 that does."""
    if group_size is None:
        fits = [g for g in (DEFAULT_GROUP_SIZE, 64, 32) if in_features % g == 0]
        if fits:
            return fits[0]
        raise ValueError(
            f"int4 needs groups of 32, 64 or 128 input features, but {name} has {in_features} on this model-parallel "
            "rank (its share of the layer), a multiple of none: use another model-parallel size, or quantize='int8'"
        )
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"int4 group_size={group_size!r} is not supported: use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if in_features % group_size:
        raise ValueError(
            f"int4 groups of {group_size} input features do not divide the {in_features} input features of {name} "
            f"on this model-parallel rank (its share of the layer): groups never straddle shards, so pass a "
            f"group_size that divides {in_features} (or None: the largest of 128, 64, 32 that does), or use "
            "another model-parallel size"
        )
    return group_size


class Int4Matrices:
    """What the int4 layers share: n matrices of one shape (out, in) with their kernel; the owning module holds
    them as buffers, packed (n, ...) in the layout the kernel reads and scales_and_zeros (n, groups, out, 2) in the
    activations' dtype. In the state dict they take the portable layout: weight uint8 (n, out, in / 2), scales
    and zeros bfloat16 (n, out, groups); loading a floating-point weight (n, out, in) quantizes it as it is read."""

    def __init__(
        self,
        n: int,
        out_features: int,
        in_features: int,
        group_size: Optional[int],
        device: torch.device,
        dtype: torch.dtype,
        name: str,
    ):
        self.group_size = choose_group_size(group_size, in_features, name)
        self.shape, self.dtype = (n, out_features, in_features), dtype
        self.kernel = int4_kernel(device, dtype, out_features, in_features)

    def empty(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n, out_features, in_features = self.shape
        with torch.device("meta"):  # only the shape of the kernel's layout
            one = pack_for(self.kernel, torch.empty(out_features, in_features, dtype=torch.uint8))
        packed = torch.empty(n, *one.shape, dtype=one.dtype, device=device)
        return packed, torch.empty(n, in_features // self.group_size, out_features, 2, dtype=self.dtype, device=device)

    def set_(
        self, packed: torch.Tensor, sz: torch.Tensor, i: int, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
    ) -> None:
        """Matrix i from values q (out, in) 0..15, scales and zeros (out, groups)."""
        packed[i] = pack_for(self.kernel, q.to(packed.device))
        sz[i] = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(sz.device, self.dtype)

    def quantize_(self, packed: torch.Tensor, sz: torch.Tensor, i: int, weight: torch.Tensor) -> None:
        """Matrix i from a floating-point weight (out, in)."""
        self.set_(packed, sz, i, *quantize_groups(weight.detach(), self.group_size))

    def linear(self, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.kernel, packed, sz, self.group_size)

    def portable(self, packed: torch.Tensor, sz: torch.Tensor) -> dict[str, torch.Tensor]:
        in_features = self.shape[2]
        weight = torch.stack([unpack_from(self.kernel, p, in_features, self.group_size) for p in packed])
        scales, zeros = sz.to(torch.bfloat16).permute(3, 0, 2, 1)  # each (n, out, groups)
        return {"weight": weight, "scales": scales, "zeros": zeros}

    def load_(
        self,
        packed: torch.Tensor,
        sz: torch.Tensor,
        state_dict: dict,
        keys: dict,
        stacked: bool,
        missing_keys: list,
        error_msgs: list,
    ) -> None:
        """Fill packed and sz from state_dict[keys["weight"]], floating-point (n, out, in), or the portable layout
        under keys "weight", "scales", "zeros". stacked False: one matrix, its tensors without the n axis."""
        n, out_features, in_features = self.shape
        groups = in_features // self.group_size
        weight = state_dict.get(keys["weight"])
        if weight is not None and weight.is_floating_point():
            shapes = {"weight": self.shape}
        else:
            shapes = {
                "weight": (n, out_features, in_features // 2),
                "scales": (n, out_features, groups),
                "zeros": (n, out_features, groups),
            }
        tensors = {}
        for role, shape in shapes.items():
            shape = shape if stacked else shape[1:]
            tensor = state_dict.get(keys[role])
            if tensor is None:
                missing_keys.append(keys[role])
            elif tensor.shape != shape:
                error_msgs.append(
                    f"{keys[role]}: shape {tuple(tensor.shape)}, expected {shape} for int4 in groups of {self.group_size}"
                )
            else:
                tensors[role] = tensor if stacked else tensor[None]
        if len(tensors) < len(shapes):
            return
        for i in range(n):
            if len(tensors) == 1:
                self.quantize_(packed, sz, i, tensors["weight"][i])
            else:
                self.set_(packed, sz, i, unpack_pairs(tensors["weight"][i]), tensors["scales"][i], tensors["zeros"][i])


class Int4Linear(ParallelLinear):
    """y = x @ W^T for this rank's shard of W in int4, groups of group_size along its input features.

    State dict: weight (out, in / 2) uint8, scales and zeros (out, groups) bfloat16; a floating-point weight
    (Meta's) loaded into it is quantized."""

    def __init__(
        self,
        linear: nn.Module,
        group_size: Optional[int] = None,
        name: str = "a linear layer",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(linear)
        w = linear.weight
        device, dtype = torch.device(device or w.device), dtype or w.dtype
        self.int4 = Int4Matrices(1, *w.shape, group_size, device, dtype, name)
        packed, sz = self.int4.empty(device)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        if w.device.type != "meta":
            self.int4.quantize_(self.packed, self.scales_and_zeros, 0, w)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.int4.linear(x, self.packed[0], self.scales_and_zeros[0])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, tensor in self.int4.portable(self.packed, self.scales_and_zeros).items():
            destination[prefix + key] = tensor[0]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        keys = {role: prefix + role for role in ("weight", "scales", "zeros")}
        self.int4.load_(self.packed, self.scales_and_zeros, state_dict, keys, False, missing_keys, error_msgs)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in keys.values())


class Int4Experts(nn.Module):
    """llama/moe.py's Experts with each expert's matrices in int4, in nn.Linear's orientation: w1, w3 (E, F, D)
    and w2 (E, D, F), groups along each one's input features (D, and this rank's share of F).

    State dict: w1, w2, w3 uint8 (E, out, in / 2), w1_scales, w1_zeros, ... (E, out, groups) bfloat16; Meta's
    floating-point w1, w3 (E, D, F) and w2 (E, F, D) loaded into it are quantized."""

    NAMES = ("w1", "w2", "w3")

    def __init__(
        self,
        experts: nn.Module,
        group_size: Optional[int] = None,
        name: str = "experts",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.int4 = {}
        for w_name in self.NAMES:
            weights = getattr(experts, w_name).detach().mT  # (E, out, in): each expert's matrix as nn.Linear's weight
            where, what = torch.device(device or weights.device), dtype or weights.dtype
            self.int4[w_name] = Int4Matrices(*weights.shape, group_size, where, what, f"{name}.{w_name}")
            packed, sz = self.int4[w_name].empty(where)
            self.register_buffer(w_name, packed, persistent=False)
            self.register_buffer(w_name + "_scales_and_zeros", sz, persistent=False)
            if weights.device.type != "meta":
                for e, w in enumerate(weights):  # one expert at a time: no full-size float32 copy
                    self.int4[w_name].quantize_(packed, sz, e, w)

    def forward(self, x_aD: torch.Tensor, e: int) -> torch.Tensor:
        w1, w2, w3 = (self.int4[n].linear for n in self.NAMES)
        h = F.silu(w1(x_aD, self.w1[e], self.w1_scales_and_zeros[e])) * w3(
            x_aD, self.w3[e], self.w3_scales_and_zeros[e]
        )
        return w2(h, self.w2[e], self.w2_scales_and_zeros[e])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for w_name in self.NAMES:
            portable = self.int4[w_name].portable(getattr(self, w_name), getattr(self, w_name + "_scales_and_zeros"))
            destination[prefix + w_name] = portable["weight"]
            destination[prefix + w_name + "_scales"] = portable["scales"]
            destination[prefix + w_name + "_zeros"] = portable["zeros"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        used = set()
        for name in self.NAMES:
            keys = {"weight": prefix + name, "scales": prefix + name + "_scales", "zeros": prefix + name + "_zeros"}
            state = {k: state_dict[k] for k in keys.values() if k in state_dict}
            if keys["weight"] in state and state[keys["weight"]].is_floating_point():
                state = {keys["weight"]: state[keys["weight"]].mT}  # Meta's (E, in, out), quantized here
            used.update(state)
            packed, sz = getattr(self, name), getattr(self, name + "_scales_and_zeros")
            self.int4[name].load_(packed, sz, state, keys, True, missing_keys, error_msgs)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in used)


def quantize_int4(
    model: nn.Module,
    group_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace every Column/RowParallelLinear of a model (wq, wk, wv, wo, w1, w2, w3, output, Llama 4's shared
    expert) and Llama 4's experts with int4 ones, in place; the embedding stays. Returns the model.

    group_size: input features per group (32, 64, 128 or 256), which must divide each layer's input features on
    this rank; None: 128, or the largest of 64 and 32 that divides a layer's where 128 does not. device, dtype:
    where the int4 weights go and the activations' dtype (default: the weights'); a model on the meta device
    becomes an int4 skeleton there that load_state_dict fills, from Meta's weights (quantized as they are read)
    or from a saved int4 state dict. Warns once when some product has no int4 kernel on that device."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for module in list(model.modules()):
        if isinstance(module, MoE):
            module.experts = Int4Experts(module.experts, group_size, names[id(module.experts)], device, dtype)
            layers += module.experts.int4.values()

    def make(linear: nn.Module) -> Int4Linear:
        layer = Int4Linear(linear, group_size, names[id(linear)], device, dtype)
        layers.append(layer.int4)
        return layer

    model = replace_linear_layers(model, make)
    plain = [m for m in layers if m.kernel is None]
    where = torch.device(device or next(b for b in model.buffers() if b.dtype == torch.uint8).device)
    if plain and where.type != "meta":  # on the meta device nothing runs
        warnings.warn(
            f"int4: no int4 kernel for {len(plain)} of {len(layers)} int4 weights on {where.type} with "
            f"{plain[0].dtype}; their products dequantize the weights first, slower than bfloat16 (ATen's int4 "
            "kernels: CPU, and CUDA with bfloat16 on compute capability 8.0+)",
            stacklevel=2,
        )
    return model


QUANTIZE_MODES = {"int8": quantize_int8, "int4": quantize_int4}


def check_quantize_mode(mode: Optional[str]) -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use None, 'int8' or 'int4' (weight-only)")


def quantize_model(model: nn.Module, mode: Optional[str], **options) -> nn.Module:
    """Llama.build's quantize= step: the model as it is (None), or its weights in int8 or int4, in place.
    options: quantize_int8's or quantize_int4's (device, dtype: see there)."""
    check_quantize_mode(mode)
    return model if mode is None else QUANTIZE_MODES[mode](model, **options)


# -- Memory ------------------------------------------------------------------------------------------------------------


def _weight_key(key: str) -> str:
    """The checkpoint key a quantized model's state dict key belongs to (its scales and zeros: the weight's)."""
    for suffix, replacement in ((".scales", ".weight"), (".zeros", ".weight"), ("_scales", ""), ("_zeros", "")):
        if key.endswith(suffix):
            return key[: -len(suffix)] + replacement
    return key


def weight_bytes(args, mode: Optional[str]) -> tuple[int, int]:
    """(bytes split over the model-parallel ranks, bytes every rank holds whole) of the weights of a model of args
    (a ModelArgs) in bfloat16 (mode None), int8 or int4 (groups as quantize_int4 picks them): counted over the
    state dict of the model built on the meta device, split as Meta splits each weight; the replicated ones are
    the norms and Llama 4's router. A rank of model_parallel_size holds split / model_parallel_size + whole."""
    from llama.checkpoint import split_dim
    from llama.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    quantize_model(model.to(torch.bfloat16), mode, device="meta", dtype=torch.bfloat16)
    split = whole = 0
    for key, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        if split_dim(_weight_key(key)) is None:
            whole += size
        else:
            split += size
    return split, whole


# params.json of Meta's Llama 4 releases (text model), as shipped
LLAMA4_PARAMS = {
    "Llama 4 Scout 17B-16E": dict(
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
        ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True,
        rope_scaling_factor=16.0, rope_high_freq_factor=1.0, nope_layer_interval=4, use_qk_norm=True,
        attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        moe_args=dict(num_experts=16, capacity_factor=1.0, auto_scale_F=True, top_k=1, interleave_moe_layer_step=1),
    ),
    "Llama 4 Maverick 17B-128E": dict(
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
        ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=False,
        nope_layer_interval=4, use_qk_norm=False, attention_chunk_size=8192, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1,
        moe_args=dict(num_experts=128, capacity_factor=1.0, auto_scale_F=True, top_k=1, interleave_moe_layer_step=2),
    ),
}  # fmt: skip


def memory_table(models: Optional[dict] = None, mp_sizes: tuple = (1, 2, 4, 8)) -> str:
    """A Markdown table of the weights' memory per GPU (or per process on a CPU) for each model (name: params.json
    dict; default LLAMA4_PARAMS), in bfloat16, int8 and int4, at each model-parallel size, in GB (1e9 bytes)."""
    from llama.model import ModelArgs

    header = "| Model | weights | " + " | ".join(f"MP={mp}, per GPU" for mp in mp_sizes) + " |"
    lines = [header, "|" + "---|" * (2 + len(mp_sizes))]
    for name, params in (models or LLAMA4_PARAMS).items():
        args = ModelArgs(**params)
        for mode in (None, "int8", "int4"):
            split, whole = weight_bytes(args, mode)
            sizes = [(split / mp + whole) / 1e9 for mp in mp_sizes]
            lines.append(f"| {name} | {mode or 'bf16'} | " + " | ".join(f"{s:.1f} GB" for s in sizes) + " |")
    return "\n".join(lines)


# -- Quantizing while loading --------------------------------------------------------------------------------------------


def quantized_weight_keys(model: nn.Module) -> set[str]:
    """The checkpoint keys of the weights that model's int8 and int4 layers hold."""
    keys = set()
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, (Int8Linear, Int4Linear)):
            keys.add(prefix + "weight")
        elif isinstance(module, (Int8Experts, Int4Experts)):
            keys.update(prefix + w for w in ("w1", "w2", "w3"))
    return keys


def load_quantized(model: nn.Module, key: str, weight: torch.Tensor) -> None:
    """Quantize the checkpoint's floating-point weight `key` into the int8 or int4 layer of model that holds it;
    model keeps no reference to weight."""
    module, name = key.rsplit(".", 1)
    model.get_submodule(module).load_state_dict({name: weight}, strict=False, assign=True)
