"""The CPU's matrix products for a loaded model: per weight shape, measured on this machine over the model's
own weights, PyTorch's F.linear on the weight as it is, or oneDNN on the weight packed once into its blocked
layout. No process-wide setting is read or changed; the choice lives in the model's layers."""

import ctypes
import math
import mmap
import time
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from llama.moe import Experts, MoE
from llama.parallel import ParallelLinear, replace_linear_layers

# Enough weights per timed pass to read far more than a CPU's caches hold, as a decode step does.
TIMED_BYTES = 64 << 20


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with the weight as torch.ops.mkldnn._reorder_linear_weight packed it. An op of its own so that
    torch.compile calls it as it is (inductor only lowers oneDNN's op for weights it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


class PackedLinear(ParallelLinear):
    """A fairscale linear layer with its weight (this rank's shard) in oneDNN's blocked layout: oneDNN then
    reads it in place, where a weight in PyTorch's layout is rearranged within every product."""

    def __init__(self, linear: nn.Module, packed: torch.Tensor):
        super().__init__(linear)
        self.packed = packed  # an opaque oneDNN tensor, (out_features_local, in_features_local)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.to_dense()  # Meta's key and layout


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def release(weight: torch.Tensor) -> None:
    """Let the kernel drop the pages of a weight that was packed. A checkpoint mapped from disk (torch.load's
    mmap) stays mapped while the model holds any of its tensors (the embedding), so the pages packing read
    would otherwise stay resident beside the packed copy. madvise MADV_PAGEOUT (Linux 5.4+) is only a hint:
    file pages are read again if touched, anonymous ones swapped out, never lost; elsewhere it does nothing."""
    start = -(-weight.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the weight only
    end = (weight.data_ptr() + weight.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    madvise = getattr(ctypes.CDLL(None), "madvise", None)
    if end > start and madvise is not None:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 21)  # 21: MADV_PAGEOUT


def faster(a, b, x: torch.Tensor, a_weights: list, b_weights: list) -> bool:
    """Whether products a(x, w) over a_weights take less time than b(x, w) over b_weights: the fastest of three
    passes each, taken in turn so that a busy moment on a shared machine hits both alike, after a warm-up."""
    best = {id(a_weights): math.inf, id(b_weights): math.inf}
    for i in range(4):
        for fn, weights in ((a, a_weights), (b, b_weights)):
            t = time.perf_counter()
            for w in weights:
                fn(x, w)
            if i:
                best[id(weights)] = min(best[id(weights)], time.perf_counter() - t)
    return best[id(a_weights)] < best[id(b_weights)]


class PackedExperts(nn.Module):
    """llama/moe.py's Experts with each expert's matrices packed into oneDNN's layout (nn.Linear orientation)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.packed = [[pack(getattr(experts, n)[e].mT) for n in ("w1", "w2", "w3")] for e in range(len(experts.w1))]
        for name in ("w1", "w2", "w3"):
            release(getattr(experts, name))

    def forward(self, x_aD: torch.Tensor, e: int) -> torch.Tensor:
        w1, w2, w3 = self.packed[e]
        return packed_linear(F.silu(packed_linear(x_aD, w1)) * packed_linear(x_aD, w3), w2)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for i, name in enumerate(("w1", "w2", "w3")):  # Meta's keys and shapes
            destination[prefix + name] = torch.stack([p[i].to_dense() for p in self.packed]).mT


def choose_cpu_matmul(model: nn.Module) -> nn.Module:
    """For each shape of bfloat16 CPU weight among model's Column/RowParallelLinear layers and Llama 4's experts, time
    one-row products (a decode step's) over some of the model's own weights of that shape, as they are and packed,
    and swap the layers of the shapes where packed is faster for PackedLinear (the experts for PackedExperts where
    both their shapes are); in place. Returns the model."""
    weights: dict[tuple, list] = {}  # weight shape -> the model's weights of that shape, as nn.Linear holds them
    for layer in model.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            weights.setdefault(tuple(layer.weight.shape), []).append(layer.weight)
    moes = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, Experts)]
    for moe in moes:
        for w in (moe.experts.w1, moe.experts.w2):
            weights.setdefault(tuple(w.shape[:0:-1]), []).extend(w.mT)
    packed = {shape for shape, same_shape in weights.items() if packing_is_faster(same_shape)}

    def packed_layer(layer: nn.Module) -> Optional[nn.Module]:
        if tuple(layer.weight.shape) not in packed:
            return None
        new = PackedLinear(layer, pack(layer.weight))
        release(layer.weight)
        return new

    replace_linear_layers(model, packed_layer)
    for moe in moes:
        if {tuple(moe.experts.w1.shape[:0:-1]), tuple(moe.experts.w2.shape[:0:-1])} <= packed:
            moe.experts = PackedExperts(moe.experts)
    return model


def packing_is_faster(weights: list[torch.Tensor]) -> bool:
    """Whether one-row products over (some of) these weights of one shape take less time packed than as they are."""
    weight = weights[0]
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False  # float32 products run MKL's kernels, not oneDNN's
    sample = weights[: math.ceil(TIMED_BYTES / weight.nbytes)]
    x = torch.ones(1, weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        return faster(packed_linear, F.linear, x, [pack(w) for w in sample], sample)
