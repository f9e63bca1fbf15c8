"""fairscale's model-parallel layers, with their forward and communication, built without initialising weights.

fairscale's constructors allocate with the legacy torch.Tensor(), which ignores torch.device("meta"), and on
several ranks build a full-size master weight per layer to split. Weights here come from a checkpoint, so these
subclasses only make this rank's (uninitialised) shard, on whatever device is current; bias-free, as Llama is.
"""

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs
import torch
from fairscale.nn.model_parallel.utils import VocabUtility
from torch import nn


class ColumnParallelLinear(fs.ColumnParallelLinear):
    """y = x W^T, W (out_features, in_features) split along its output features; gather_output joins them."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.output_size_per_partition = out_features // fs_init.get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.bias = self.master_weight = None


class RowParallelLinear(fs.RowParallelLinear):
    """y = x W^T, W split along its input features; each rank takes its share of x and the outputs are summed."""

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.input_size_per_partition = in_features // fs_init.get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.bias = self.master_weight = None


class VocabParallelEmbedding(fs.VocabParallelEmbedding):
    """The token embedding, its rows (the vocabulary) split over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = (
            None,
            None,
            2.0,
            False,
            False,
        )
        self._weight = None
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
