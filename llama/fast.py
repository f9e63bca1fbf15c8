"""Opt-in fast decoding (one new token per sequence), the step the generation loop runs once per token:
torch.compile of the step (compile_decode), and on a GPU, CUDA graphs of it (cuda_graph_decode). Prompts keep
the eager path. Same tokens as the plain model (tests/test_fast_paths.py, tests/test_cuda.py)."""

import warnings

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from llama.model import Transformer


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


def compile_decode(model: Transformer) -> Transformer:
    """Route model(tokens, start_pos) calls with one token per sequence through torch.compile, in place.

    The first decode steps compile (about a minute for a 1B model on a small CPU); positions are marked
    dynamic, so one compiled graph serves every position. Returns the model.
    """
    without_fairscale(model)
    eager = model.forward
    # On a CPU, store every intermediate instead of recomputing it inside each consumer: otherwise the
    # compiler folds RMSNorm into the int8 layers' dot products, redoing it for every weight row. At one
    # token the stored intermediates are a few KB.
    cpu = next(model.parameters()).device.type == "cpu"
    options = {"realize_opcount_threshold": 0, "realize_reads_threshold": 0} if cpu else None
    # Compile the forward without its inference_mode decorator, and enter inference mode outside the
    # compiled region: entering it inside breaks dynamic-shape tracing of the cache slices.
    compiled = torch.compile(eager.__wrapped__.__get__(model), dynamic=True, options=options)

    chunk_size = model.params.attention_chunk_size

    def forward(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        # The first position of a chunk (Llama 4) attends over one key in its chunked layers; inductor (torch
        # 2.13) miscompiles a product over a dimension of symbolic size that is 1 at run time, so that step, one
        # in every chunk, runs eagerly.
        if tokens.shape[1] != 1 or (chunk_size and start_pos % chunk_size == 0):
            return eager(tokens, start_pos, last_only)
        with torch.inference_mode():
            return compiled(tokens, start_pos, last_only)

    model.forward = forward
    return model


class CUDAGraphDecode:
    """Replays the model's one-token step from a CUDA graph per batch size, recorded on first use: one launch
    per token instead of hundreds, so the GPU never waits for Python. The graph records the model's own
    forward with the position in a device tensor, so every shape is the same at every position."""

    def __init__(self, model: Transformer, forward):
        self.model = model
        self.forward = forward  # the model's forward before cuda_graph_decode replaced it
        self.graphs: dict[int, tuple] = {}

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz = tokens.shape[0]
        if bsz not in self.graphs:
            self.graphs[bsz] = self.record(bsz, tokens.device, start_pos)
        graph, static_tokens, pos, logits = self.graphs[bsz]
        static_tokens.copy_(tokens)
        pos.fill_(start_pos)
        graph.replay()
        return logits.clone()  # the graph's output buffer is overwritten by the next step

    @torch.inference_mode()
    def record(self, bsz: int, device: torch.device, start_pos: int) -> tuple:
        tokens = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        # Warm-up runs (Triton compiles, cuBLAS picks its kernels) and the recording write the cache at the
        # position of the step about to run, which that step overwrites before it reads it, so a generation
        # under way keeps its cache intact (a chunked layer's other slots included).
        pos = torch.full((1,), start_pos, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(tokens, pos)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward(tokens, pos)
        return graph, tokens, pos, logits


def cuda_graph_decode(model: Transformer) -> Transformer:
    """Route model(tokens, start_pos) calls with one token per sequence on a CUDA GPU through CUDA graphs
    (CUDAGraphDecode), in place; prompts, and everything on a CPU, keep the eager path. Returns the model."""
    if model.params.moe_args is not None:
        # The routed experts ask the host how many tokens each expert has, which a graph cannot record.
        warnings.warn("CUDA graphs do not cover Llama 4's routed experts yet: decoding runs eagerly", stacklevel=2)
        return model
    eager = model.forward
    graphs = model.decode_graphs = CUDAGraphDecode(model, eager)

    def forward(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        fits = bsz <= model.params.max_batch_size and 0 <= start_pos < model.params.max_seq_len
        if seqlen != 1 or not tokens.is_cuda or not fits:
            return eager(tokens, start_pos, last_only)  # (which raises the errors of calls that do not fit)
        return graphs(tokens, start_pos)

    model.forward = forward
    return model
