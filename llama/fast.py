"""Opt-in fast decoding (one new token per sequence), the step the generation loop runs once per token:
torch.compile of the step (compile_decode), and on a GPU, CUDA graphs of it (cuda_graph_decode). Prompts keep
the eager path. Same tokens as the plain model (tests/test_fast_paths.py, tests/test_cuda.py)."""

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

import kernels
from llama.model import Transformer, apply_rotary_emb


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
    # compiler folds RMSNorm into the int8 layers' dot products, redoing it for every weight row (int8
    # decoding of the Llama 3.2 1B shape: 13.6 tok/s, against 20.5 without). At one token they are a few KB.
    cpu = next(model.parameters()).device.type == "cpu"
    options = {"realize_opcount_threshold": 0, "realize_reads_threshold": 0} if cpu else None
    # Compile the forward without its inference_mode decorator, and enter inference mode outside the
    # compiled region: entering it inside breaks dynamic-shape tracing of the cache slices.
    compiled = torch.compile(eager.__wrapped__.__get__(model), dynamic=True, options=options)

    def forward(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        if tokens.shape[1] != 1:
            return eager(tokens, start_pos, last_only)
        with torch.inference_mode():
            return compiled(tokens, start_pos, last_only)

    model.forward = forward
    return model


def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Transformer.forward for one token per sequence, tokens (bs, 1), at the position held in pos, a
    one-element int64 tensor on the model's device: every shape and every launch is the same at every
    position, so the step can be recorded once as a CUDA graph and replayed. The model's own layers and
    computation, spelled out with the cache written and read at a position the GPU reads."""
    bsz = tokens.shape[0]
    h = model.tok_embeddings(tokens)
    model.freqs_cis = model.freqs_cis.to(h.device)  # no-op once it is there
    freqs_cis = model.freqs_cis.index_select(0, pos)  # (1, head_dim / 2, 2)
    for layer in model.layers:
        attn = layer.attention
        x = layer.attention_norm(h)
        xq = attn.wq(x).view(bsz, 1, attn.n_local_heads, attn.head_dim)
        xk = attn.wk(x).view(bsz, 1, attn.n_local_kv_heads, attn.head_dim)
        xv = attn.wv(x).view(bsz, 1, attn.n_local_kv_heads, attn.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        attn.cache_k[:bsz].index_copy_(2, pos, xk.transpose(1, 2))
        attn.cache_v[:bsz].index_copy_(2, pos, xv.transpose(1, 2))
        # The whole cache, (bs, max_seq_len, n_kv_heads, head_dim); attention reads positions 0 .. pos.
        keys, values = attn.cache_k[:bsz].transpose(1, 2), attn.cache_v[:bsz].transpose(1, 2)
        h = h + attn.wo(kernels.attention(xq, keys, values, pos).reshape(bsz, 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()  # (bs, 1, vocab_size)


class CUDAGraphDecode:
    """Replays decode_step from a CUDA graph per batch size, recorded on first use: one launch per token
    instead of hundreds, so the GPU never waits for Python."""

    def __init__(self, model: Transformer):
        self.model = model
        self.graphs: dict[int, tuple] = {}

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz = tokens.shape[0]
        if bsz not in self.graphs:
            self.graphs[bsz] = self.record(bsz, tokens.device)
        graph, static_tokens, pos, logits = self.graphs[bsz]
        static_tokens.copy_(tokens)
        pos.fill_(start_pos)
        graph.replay()
        return logits.clone()  # the graph's output buffer is overwritten by the next step

    @torch.inference_mode()
    def record(self, bsz: int, device: torch.device) -> tuple:
        tokens = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        # Warm-up runs (Triton compiles, cuBLAS picks its kernels) write the cache at the last position,
        # which no step reads before it writes it, so a generation under way keeps its cache intact.
        pos = torch.full((1,), self.model.params.max_seq_len - 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_step(self.model, tokens, pos)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode_step(self.model, tokens, pos)
        return graph, tokens, pos, logits


def cuda_graph_decode(model: Transformer) -> Transformer:
    """Route model(tokens, start_pos) calls with one token per sequence on a CUDA GPU through CUDA graphs
    (CUDAGraphDecode), in place; prompts, and everything on a CPU, keep the eager path. Returns the model."""
    eager = model.forward
    graphs = model.decode_graphs = CUDAGraphDecode(model)

    def forward(tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        fits = bsz <= model.params.max_batch_size and 0 <= start_pos < model.params.max_seq_len
        if seqlen != 1 or not tokens.is_cuda or not fits:
            return eager(tokens, start_pos, last_only)  # (which raises the errors of calls that do not fit)
        return graphs(tokens, start_pos)

    model.forward = forward
    return model
