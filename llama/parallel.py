"""fairscale's model-parallel layers, and stand-ins for them that compute the product another way.

fairscale's constructors allocate with the legacy torch.Tensor(), which ignores torch.device("meta"), and on
several ranks build a full-size master weight per layer to split. Weights here come from a checkpoint, so the
subclasses below only make this rank's (uninitialised) shard, on whatever device is current; bias-free, as Llama's
language model is (Llama 4's vision encoder asks for biases). ParallelLinear keeps fairscale's communication around another product (int8 weights in llama/quantize.py,
packed weights in llama/cpu.py).
"""

from typing import Callable, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs
import fairscale.nn.model_parallel.mappings as mp
import torch
from fairscale.nn.model_parallel.utils import VocabUtility
from torch import nn


class ColumnParallelLinear(fs.ColumnParallelLinear):
    """y = x W^T, W (out_features, in_features) split along its output features; gather_output joins them."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True, bias: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.output_size_per_partition = out_features // fs_init.get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.bias = nn.Parameter(torch.empty(self.output_size_per_partition)) if bias else None  # split as W is


class RowParallelLinear(fs.RowParallelLinear):
    """y = x W^T, W split along its input features; each rank takes its share of x and the outputs are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.input_size_per_partition = in_features // fs_init.get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # whole, added after the sum


class VocabParallelEmbedding(fs.VocabParallelEmbedding):
    """The token embedding, its rows (the vocabulary) split over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # F.embedding's options, as fairscale's forward passes them
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))


class ParallelLinear(nn.Module):
    """fairscale's communication around self.matmul(x), this rank's product, which subclasses define."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.column = isinstance(linear, fs.ColumnParallelLinear)
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
    """Swap each Column/RowParallelLinear of the language model for make(layer), in place, where that is not None:
    the one way the fast paths change a model's products (int8 in llama/quantize.py, packed weights in llama/cpu.py,
    plain layers for torch.compile in llama/fast.py). Llama 4's vision tower (vision_embeddings, vision_projection)
    stays as it is, as Meta's quantization leaves it: under 1% of Scout's weights, run once per image, with
    biases, which the replacements do not add."""
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if f"{path}.{name}".lstrip(".").startswith("vision_"):
                continue
            if isinstance(child, (fs.ColumnParallelLinear, fs.RowParallelLinear)):
                new = make(child)
                if new is not None:
                    setattr(parent, name, new)
    return model
