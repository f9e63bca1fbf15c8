"""Opt-in torch.compile of the decode step (one new token per sequence), which the generation loop runs
once per token; prompts keep the eager path. Same tokens as the plain model (tests/test_fast_paths.py)."""

from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from llama.model import Transformer, onednn_matmuls


class Linear(nn.Module):
    """A fairscale Column/RowParallelLinear on one process, minus its communication (a no-op there, but an
    autograd.Function that torch.compile cannot trace). Shares the layer's weight."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.weight = layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(Linear):
    """fairscale's VocabParallelEmbedding on one process, likewise."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def without_fairscale(model: nn.Module) -> nn.Module:
    """On a single model-parallel rank, swap fairscale's layers for plain ones (same weights), in place."""
    if fs_init.get_model_parallel_world_size() == 1:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                    setattr(parent, name, Linear(child))
                elif isinstance(child, VocabParallelEmbedding):
                    setattr(parent, name, Embedding(child))
    return model


def compile_decode(model: Transformer, mode: Optional[str] = None) -> Transformer:
    """Route model(tokens, start_pos) calls with one token per sequence through torch.compile, in place.

    The first decode steps compile (about a minute for a 1B model on a small CPU); positions are marked
    dynamic, so one compiled graph serves every position. mode: torch.compile's mode (None: default).
    Returns the model.
    """
    without_fairscale(model)
    eager = model.forward
    # Compile the forward without its inference_mode decorator, and enter inference mode outside the
    # compiled region: entering it inside breaks dynamic-shape tracing of the cache slices.
    compiled = torch.compile(eager.__wrapped__.__get__(model), mode=mode, dynamic=True)

    def forward(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        if tokens.shape[1] != 1:
            return eager(tokens, start_pos, last_only)
        # The model turns oneDNN off for one-token matmuls; a compiled graph does not replay that switch.
        with torch.inference_mode(), onednn_matmuls(enabled=tokens.numel() > 1):
            return compiled(tokens, start_pos, last_only)

    model.forward = forward
    return model
