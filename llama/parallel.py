"""Stand-ins for fairscale's ColumnParallelLinear and RowParallelLinear that compute the product another way
(int8 weights in llama/quantize.py, packed weights in llama/cpu.py) and keep the model-parallel communication."""

from typing import Callable, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.mappings as mp
import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn


class ParallelLinear(nn.Module):
    """fairscale's communication around self.matmul(x), this rank's product, which subclasses define."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.column = isinstance(linear, ColumnParallelLinear)
        self.gather_output = getattr(linear, "gather_output", False)
        self.input_is_parallel = getattr(linear, "input_is_parallel", True)
        # One rank: fairscale's communication is a no-op, but costs time and stops torch.compile; skip it.
        self.parallel = fs_init.get_model_parallel_world_size() > 1

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel:
            return self.matmul(x)
        if self.column:
            # As ColumnParallelLinear: identity forward (all-reduce of gradients), local output features,
            # gathered across ranks when asked.
            out = self.matmul(mp.copy_to_model_parallel_region(x))
            return mp.gather_from_model_parallel_region(out) if self.gather_output else out
        # As RowParallelLinear: this rank's input features in, partial sums all-reduced out.
        if not self.input_is_parallel:
            x = mp.scatter_to_model_parallel_region(x)
        return mp.reduce_from_model_parallel_region(self.matmul(x))


def replace_linear_layers(model: nn.Module, make: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Swap each Column/RowParallelLinear of model for make(layer), in place, where that is not None."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                new = make(child)
                if new is not None:
                    setattr(parent, name, new)
    return model
