"""The Llama architecture (Llama 1, 2, 3, 3.1, 3.2 and 3.3 text models) in one file, read top to bottom.

Names are Meta's (wq, wk, wv, wo, w1, w2, w3, freqs_cis), so the state-dict keys are exactly those of
consolidated.NN.pth. Linear layers are fairscale's model-parallel ones; with one process they are plain.
"""

import math
from dataclasses import dataclass
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

import kernels


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: one KV head per query head (Llama 1/2 multi-head attention)
    vocab_size: int = -1  # -1 in Llama 2's params.json: take it from the tokenizer
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2's params.json has none; Llama 3's says 500000
    use_scaled_rope: bool = False  # Llama 3.1+: slow the low RoPE frequencies down for a 128K context
    rope_scaling_factor: Optional[float] = None  # None: 32 for the Llama 3.2 1B and 3B shapes, else 8

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of an even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight
        return kernels.rms_norm(x, self.weight, self.eps)


# Rotary position embeddings: each pair of features (2i, 2i+1) of a query or key at position p is rotated
# by the angle p * theta^(-2i / head_dim). freqs_cis holds (cos, sin) of every angle, in float32.


def rope_scaling_factor(args: ModelArgs) -> float:
    if args.rope_scaling_factor is not None:
        return args.rope_scaling_factor
    # Meta's code uses 8 for every scaled model, but Llama 3.2 1B and 3B were trained with 32.
    return 32.0 if (args.dim, args.n_layers) in ((2048, 16), (3072, 28)) else 8.0


def apply_scaling(freqs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    # Llama 3.1: wavelengths longer than the original 8K context are stretched by scale_factor, those
    # shorter than a quarter of it are kept, and the ones in between blend smoothly from one to the other.
    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > old_context_len / low_freq_factor, freqs / scale_factor, blended)
    return torch.where(wavelen < old_context_len / high_freq_factor, freqs, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scale_factor: Optional[float] = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scale_factor is not None:
        freqs = apply_scaling(freqs, scale_factor)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, head_dim / 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (end, head_dim / 2, 2)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: (bs, seqlen, n_heads, head_dim), freqs_cis: (seqlen, head_dim / 2, 2). Each pair (x0, x1) read as
    # the complex number x0 + i x1 and multiplied by cos + i sin: one kernel for the rotation.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (bs, seqlen, n_heads, head_dim / 2)
    rotated = pairs * torch.view_as_complex(freqs_cis)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def _keep(w: torch.Tensor) -> torch.Tensor:
    return w  # init_method for fairscale layers: weights come from a checkpoint, so skip initialising


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        model_parallel_size = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = args.n_kv_heads // model_parallel_size
        self.head_dim = args.dim // args.n_heads

        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.wk = ColumnParallelLinear(
            args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.wv = ColumnParallelLinear(
            args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep
        )

        # The KV cache: keys and values of every position so far, written in place, never reallocated. Heads
        # first, so each KV head's positions are one contiguous matrix that attention reads without a copy.
        cache_shape = (args.max_batch_size, self.n_local_kv_heads, args.max_seq_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape  # (bs, seqlen, dim)
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)

        end = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end] = xv.transpose(1, 2)
        keys = self.cache_k[:bsz, :, :end].transpose(1, 2)  # (bs, end, n_local_kv_heads, head_dim), a view
        values = self.cache_v[:bsz, :, :end].transpose(1, 2)
        # Grouped-query attention: query head h reads KV head h // (n_heads // n_kv_heads), K/V not repeated.
        output = kernels.attention(xq, keys, values, start_pos)
        return self.wo(output.reshape(bsz, seqlen, -1))  # (bs, seqlen, n_local_heads, head_dim) -> (bs, seqlen, dim)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    # Meta's rule: two thirds of 4 * dim (SwiGLU has three matrices, not two), times the optional
    # multiplier, rounded up to a multiple of multiple_of.
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(f"vocab_size is {params.vocab_size}: set it from the tokenizer (tokenizer.n_words)")
        self.params = params
        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_keep)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the RoPE angles. Made on the
        # CPU even when the model is built on the meta device, and moved on the first forward.
        with torch.device("cpu"):
            self.freqs_cis = precompute_freqs_cis(
                params.dim // params.n_heads,
                params.max_seq_len,
                params.rope_theta,
                rope_scaling_factor(params) if params.use_scaled_rope else None,
            )

    def setup_caches(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate empty KV caches on device, e.g. after the weights of a meta-device model were loaded."""
        for layer in self.layers:
            attn = layer.attention
            attn.cache_k = torch.zeros_like(attn.cache_k, device=device, dtype=dtype)
            attn.cache_v = torch.zeros_like(attn.cache_v, device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for tokens (bs, seqlen) placed at positions start_pos .. start_pos + seqlen - 1.

        With last_only, only the last position is projected to the vocabulary: (bs, 1, vocab_size).
        """
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size or start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(
                f"{bsz} sequences up to position {start_pos + seqlen} do not fit this model's cache "
                f"(max_batch_size={self.params.max_batch_size}, max_seq_len={self.params.max_seq_len})"
            )
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        self.freqs_cis = self.freqs_cis.to(h.device)  # no-op once it is there
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (bs, seqlen or 1, vocab_size)
