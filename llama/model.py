"""The Llama architecture (Llama 1, 2, 3, 3.1, 3.2, 3.3 and Llama 4 text models) in one file, read top to bottom.

Names are Meta's (wq, wk, wv, wo, w1, w2, w3, freqs_cis), so the state-dict keys are exactly those of
consolidated.NN.pth. Linear layers are fairscale's model-parallel ones; with one process they are plain.
Llama 4 is the Llama 3 block with a few per-layer switches (layers without RoPE, QK norm, chunked local
attention, attention temperature tuning) and a mixture-of-experts feed-forward (llama/moe.py). The settings
(ModelArgs) and the sizes derived from them (head_dim, the hidden sizes) are in llama/args.py.
"""

import math
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from torch import nn

import llama_kernels
from llama.args import ModelArgs
from llama.moe import MoE
from llama.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

# A position: an int, or (for one token per sequence) a one-element int64 tensor on the model's device, so that
# a decoding step has the same shapes at every position and can be recorded once as a CUDA graph.
Position = Union[int, torch.Tensor]


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # x / sqrt(mean(x^2) + eps) in float32, cast back to x's dtype
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rms_norm(x), then times the weight (a Triton kernel on CUDA, kernels/llama_kernels/)
        return llama_kernels.rms_norm(x, self.weight, self.eps)


# Rotary position embeddings: each pair of features (2i, 2i+1) of a query or key at position p is rotated
# by the angle p * theta^(-2i / head_dim). freqs_cis holds (cos, sin) of every angle, in float32.


def apply_scaling(freqs: torch.Tensor, scale_factor: float, high_freq_factor: float) -> torch.Tensor:
    # Llama 3.1 and 4: wavelengths longer than the original 8K context are stretched by scale_factor, those
    # shorter than 8K / high_freq_factor are kept, and the ones in between blend smoothly from one to the other
    # (Llama 4's high_freq_factor of 1 leaves no band in between).
    low_freq_factor, old_context_len = 1.0, 8192
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / max(high_freq_factor - low_freq_factor, 1e-9)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > old_context_len / low_freq_factor, freqs / scale_factor, blended)
    return torch.where(wavelen < old_context_len / high_freq_factor, freqs, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaling: Optional[tuple[float, float]] = None):
    """(end, head_dim / 2, 2): cos and sin of each angle; scaling: (scale_factor, high_freq_factor) or None."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = apply_scaling(freqs, *scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, head_dim / 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: (bs, seqlen, n_heads, head_dim), freqs_cis: (seqlen, head_dim / 2, 2). Each pair (x0, x1) read as
    # the complex number x0 + i x1 and multiplied by cos + i sin: one kernel for the rotation.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (bs, seqlen, n_heads, head_dim / 2)
    rotated = pairs * torch.view_as_complex(freqs_cis)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def chunk_spans(start_pos: Position, seqlen: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split the positions start_pos .. start_pos + seqlen - 1 where they cross a multiple of chunk_size:
    [(a, b), ...] such that positions start_pos + a .. start_pos + b - 1 lie in one chunk."""
    if seqlen == 1:
        return [(0, 1)]
    bounds = [0, *range(chunk_size - start_pos % chunk_size, seqlen, chunk_size), seqlen]
    return list(zip(bounds[:-1], bounds[1:]))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        model_parallel_size = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = args.n_kv_heads // model_parallel_size
        self.head_dim = args.head_dim
        self.norm_eps = args.norm_eps
        # Llama 4's layers without RoPE (NoPE) attend to every earlier position and tune their temperature; the
        # RoPE layers may normalise q and k, and attend only within their chunk of attention_chunk_size positions.
        self.use_rope = not args.is_nope_layer(layer_id)
        self.use_qk_norm = args.use_qk_norm and self.use_rope
        self.temperature_tuning = args.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
        self.chunk_size = args.attention_chunk_size if self.use_rope else None

        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)

        # The KV cache: keys and values of every position so far, written in place, never reallocated. Heads
        # first, so each KV head's positions are one contiguous matrix that attention reads without a copy. A
        # chunked layer keeps only the current chunk (position p in slot p % chunk_size): it never reads more.
        cache_len = min(args.max_seq_len, self.chunk_size or args.max_seq_len)
        cache_shape = (args.max_batch_size, self.n_local_kv_heads, cache_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: Position, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape  # (bs, seqlen, dim)
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        if self.use_rope:
            xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        if self.use_qk_norm:
            xq, xk = rms_norm(xq, self.norm_eps), rms_norm(xk, self.norm_eps)
        if self.temperature_tuning:
            # Sharper attention far into a long context: q times log(floor((pos + 1) / floor_scale) + 1) *
            # attn_scale + 1, which is 1 for the first floor_scale positions. In float32, cast back to q's dtype.
            pos = torch.arange(seqlen, device=x.device) + start_pos
            scale = torch.log(torch.floor((pos + 1.0) / self.floor_scale) + 1.0) * self.attn_scale + 1.0
            xq = (xq.float() * scale[None, :, None, None]).type_as(xq)

        if self.chunk_size is None:
            output = self.attend(xq, xk, xv, start_pos)
        else:  # each piece of the new positions that lies in one chunk attends within that chunk
            pieces = chunk_spans(start_pos, seqlen, self.chunk_size)
            output = torch.cat(
                [self.attend(xq[:, a:b], xk[:, a:b], xv[:, a:b], (start_pos + a) % self.chunk_size) for a, b in pieces],
                dim=1,
            )
        return self.wo(output.reshape(bsz, seqlen, -1))  # (bs, seqlen, n_local_heads, head_dim) -> (bs, seqlen, dim)

    def attend(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, slot: Position) -> torch.Tensor:
        """Write xk, xv into the cache from slot on, then attend causally from xq over the cache up to there."""
        bsz, seqlen = xq.shape[:2]
        if isinstance(slot, int):
            self.cache_k[:bsz, :, slot : slot + seqlen] = xk.transpose(1, 2)
            self.cache_v[:bsz, :, slot : slot + seqlen] = xv.transpose(1, 2)
            end = slot + seqlen
        else:  # a position on the device: read the whole cache, attention masks what lies past the slot
            self.cache_k[:bsz].index_copy_(2, slot, xk.transpose(1, 2))
            self.cache_v[:bsz].index_copy_(2, slot, xv.transpose(1, 2))
            end = self.cache_k.shape[2]
        keys = self.cache_k[:bsz, :, :end].transpose(1, 2)  # (bs, end, n_local_kv_heads, head_dim), a view
        values = self.cache_v[:bsz, :, :end].transpose(1, 2)
        # Grouped-query attention: query head h reads KV head h // (n_heads // n_kv_heads), K/V not repeated.
        return llama_kernels.attention(xq, keys, values, slot)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)
        self.w2 = RowParallelLinear(hidden_dim, dim)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        if args.is_moe_layer(layer_id):
            # Llama 4: routed experts beside a shared expert, a plain SwiGLU feed-forward of the experts' size
            hidden_dim = args.expert_hidden_dim
            self.feed_forward = MoE(args.dim, hidden_dim, args.moe_args, FeedForward(args.dim, hidden_dim))
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: Position, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(f"vocab_size is {params.vocab_size}: set it from the tokenizer (tokenizer.n_words)")
        self.params = params
        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size)
        if params.vision_args is not None:  # Llama 4 with images: the vision encoder, and its way into the model
            from llama.vision import VisionEmbeddings  # (llama/vision.py imports this module)

            self.vision_embeddings = VisionEmbeddings(params.vision_args)
            self.vision_projection = ColumnParallelLinear(params.vision_args.output_dim, params.dim)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the RoPE angles. Made on the
        # CPU even when the model is built on the meta device, and moved on the first forward.
        with torch.device("cpu"):
            self.freqs_cis = precompute_freqs_cis(
                params.head_dim,
                params.max_seq_len,
                params.rope_theta,
                (params.rope_scaling_factor, params.rope_high_freq_factor) if params.use_scaled_rope else None,
            )

    def setup_caches(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate empty KV caches on device, e.g. after the weights of a meta-device model were loaded."""
        for layer in self.layers:
            attn = layer.attention
            attn.cache_k = torch.zeros_like(attn.cache_k, device=device, dtype=dtype)
            attn.cache_v = torch.zeros_like(attn.cache_v, device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Position,
        last_only: bool = False,
        images: Optional[list[torch.Tensor]] = None,
        image_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (float32) for tokens (bs, seqlen) placed at positions start_pos .. start_pos + seqlen - 1.

        With last_only, only the last position is projected to the vocabulary: (bs, 1, vocab_size).
        start_pos may be a one-element int64 tensor on the model's device when seqlen is 1 (CUDA graphs).
        Images (Llama 4 with vision_args): one (n_chunks, 3, S, S) pixel tensor per image, and image_mask, bool
        (bs, seqlen), True at their <|patch|> tokens, in the same order (row by row, then by position).
        """
        bsz, seqlen = tokens.shape
        if isinstance(start_pos, int):
            if bsz > self.params.max_batch_size or start_pos + seqlen > self.params.max_seq_len:
                raise ValueError(
                    f"{bsz} sequences up to position {start_pos + seqlen} do not fit this model's cache "
                    f"(max_batch_size={self.params.max_batch_size}, max_seq_len={self.params.max_seq_len})"
                )
        elif seqlen != 1:
            raise ValueError(f"a start_pos tensor takes one token per sequence, got {seqlen}")
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        if images is not None or image_mask is not None:
            h = self.embed_images(h, images, image_mask)
        self.freqs_cis = self.freqs_cis.to(h.device)  # no-op once it is there
        if isinstance(start_pos, int):
            freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
        else:
            freqs_cis = self.freqs_cis[start_pos]
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (bs, seqlen or 1, vocab_size)

    def embed_images(self, h: torch.Tensor, images: Optional[list], image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """h with its rows at image_mask (the <|patch|> tokens) replaced by the images' patch embeddings, in order."""
        if not hasattr(self, "vision_embeddings"):
            raise ValueError(
                "this model has no vision encoder (no vision_args in its settings, or a text-only build): "
                "it cannot take images"
            )
        if images is None or image_mask is None:
            raise ValueError("images and image_mask go together: pass both or neither")
        if image_mask.shape != h.shape[:2] or image_mask.dtype != torch.bool:
            raise ValueError(
                f"image_mask must be a bool tensor of the tokens' shape {tuple(h.shape[:2])}, "
                f"got {image_mask.dtype} {tuple(image_mask.shape)}"
            )
        size = self.params.vision_args.image_size
        tile = (3, size.height, size.width)
        for image in images:
            if not isinstance(image, torch.Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != tile:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(
                    f"each image must be a pixel tensor (n_chunks, {', '.join(map(str, tile))}), got {shape}"
                )
        n_patches = sum(image.shape[0] for image in images) * self.params.vision_args.patches_per_chunk
        if int(image_mask.sum()) != n_patches:
            raise ValueError(
                f"image_mask marks {int(image_mask.sum())} positions but the images have {n_patches} patches: "
                "pass exactly the images whose <|patch|> tokens are in these tokens"
            )
        if n_patches == 0:
            return h
        patches = self.vision_embeddings(images)  # (n_chunks, patches_per_chunk, output_dim)
        patches = self.vision_projection(patches.flatten(0, 1))  # (n_patches, dim)
        return h.masked_scatter(image_mask.to(h.device)[..., None], patches.to(h.dtype))
