"""Opt-in fast decoding: faster ways to run the model's own forward for the one-token steps the generation loop
takes once per token. compile_decode: torch.compile of the forward; cuda_graph_decode: the forward recorded as
CUDA graphs. Each returns a step called as the model is, model(tokens, start_pos, last_only), which leaves every
other call (prompts) to the model. Same tokens as the plain model (tests/test_fast_paths.py, tests/test_cuda.py)."""

import sys
import warnings
from typing import Callable

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import VocabParallelEmbedding
from torch import nn

from llama.model import Transformer
from llama.moe import MoE
from llama.parallel import replace_linear_layers

DecodeStep = Callable[..., torch.Tensor]  # (tokens, start_pos, last_only=False) -> logits, as Transformer.forward


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


def without_fairscale(model: Transformer) -> Transformer:
    """On a single model-parallel rank, swap fairscale's layers for plain ones (same weights), in place."""
    if fs_init.get_model_parallel_world_size() == 1:
        replace_linear_layers(model, Linear)
        if isinstance(model.tok_embeddings, VocabParallelEmbedding):
            model.tok_embeddings = Embedding(model.tok_embeddings)
    return model


def compile_decode(model: Transformer) -> DecodeStep:
    """The model's one-token steps through torch.compile of its forward; on one rank, fairscale's layers are
    swapped for plain ones first (in place).

    The first steps compile (about a minute for a 1B model on a small CPU); positions are marked dynamic, so one
    compiled graph serves every position.
    """
    without_fairscale(model)
    for module in model.modules():
        if isinstance(module, MoE):
            # Which experts run depends on the data, so the compiler would trace the routed experts anew for every
            # routing it meets: they run eagerly between the compiled parts. (Applied here, not as a decorator in
            # moe.py: torch.compiler.disable imports torch._dynamo, a second or so that plain `import llama` skips.)
            module.routed = torch.compiler.disable(module.routed)
    # On a CPU, store every intermediate instead of recomputing it inside each consumer: otherwise the
    # compiler folds RMSNorm into the int8 layers' dot products, redoing it for every weight row. At one
    # token the stored intermediates are a few KB.
    cpu = next(model.parameters()).device.type == "cpu"
    options = {"realize_opcount_threshold": 0, "realize_reads_threshold": 0} if cpu else None
    # Compile the forward without its inference_mode decorator, and enter inference mode outside the
    # compiled region: entering it inside breaks dynamic-shape tracing of the cache slices.
    compiled = torch.compile(model.forward.__wrapped__.__get__(model), dynamic=True, options=options)
    chunk_size = model.params.attention_chunk_size
    compiled_yet = False

    def decode_step(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        nonlocal compiled_yet
        # The first position of a chunk (Llama 4) attends over one key in its chunked layers; inductor (torch
        # 2.13) miscompiles a product over a dimension of symbolic size that is 1 at run time, so that step, one
        # in every chunk, runs eagerly.
        if tokens.shape[1] != 1 or (chunk_size and start_pos % chunk_size == 0):
            return model(tokens, start_pos, last_only)
        if compiled_yet:
            with torch.inference_mode():
                return compiled(tokens, start_pos, last_only)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print("llama: compiling the decode step (its first steps take a minute or so)...", file=sys.stderr)
        with torch.inference_mode(), warnings.catch_warnings():
            # RoPE's complex product is left to eager kernels, as intended; inductor says so once per process, at
            # the first compilation.
            warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex operators")
            logits = compiled(tokens, start_pos, last_only)
        compiled_yet = True
        return logits

    return decode_step


class CUDAGraphDecode:
    """Replays the model's one-token step from a CUDA graph per batch size, recorded on first use: one launch
    per token instead of hundreds, so the GPU never waits for Python. The graph records the model's own
    forward with the position in a device tensor, so every shape is the same at every position. Prompts, and
    everything on a CPU, go to the model."""

    def __init__(self, model: Transformer):
        self.model = model
        self.graphs: dict[int, tuple] = {}

    def __call__(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        fits = bsz <= self.model.params.max_batch_size and 0 <= start_pos < self.model.params.max_seq_len
        if seqlen != 1 or not tokens.is_cuda or not fits:
            return self.model(tokens, start_pos, last_only)  # (which raises the errors of calls that do not fit)
        return self.replay(tokens, start_pos)

    @torch.inference_mode()
    def replay(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
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
                self.model(tokens, pos)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model(tokens, pos)
        return graph, tokens, pos, logits


def cuda_graph_decode(model: Transformer) -> DecodeStep:
    """The model's one-token steps on a CUDA GPU replayed from CUDA graphs (CUDAGraphDecode)."""
    if model.params.moe_args is not None:
        # The routed experts ask the host how many tokens each expert has, which a graph cannot record.
        warnings.warn("CUDA graphs do not cover Llama 4's routed experts yet: decoding runs eagerly", stacklevel=2)
        return model
    return CUDAGraphDecode(model)
