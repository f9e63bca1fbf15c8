"""Pure-PyTorch versions of the ops in kernels/: the reference the Triton kernels are tested against,
and the path used on CPU."""

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Meta's rounding: normalise in float32, cast back to x's dtype, then scale by the weight.
    # x / sqrt(mean(x^2) + eps), fused in one kernel rather than spelled out in several.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Causal grouped-query attention of new queries over a KV cache.

    q: (bs, seqlen, n_heads, head_dim), the queries at positions start_pos .. start_pos + seqlen - 1.
    k, v: (bs, start_pos + seqlen, n_kv_heads, head_dim), every key and value up to the last query.
    Query head h reads KV head h // (n_heads // n_kv_heads). Returns (bs, seqlen, n_heads, head_dim).
    For one query per sequence, start_pos may be a one-element tensor on q's device; k, v may then run past
    it (the whole cache), and the positions after it are masked: the same shapes at every position.
    """
    bs, seqlen, n_heads, head_dim = q.shape
    kv_len, n_kv_heads = k.shape[1], k.shape[2]
    group, dtype = n_heads // n_kv_heads, q.dtype
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (bs, n_kv_heads, kv_len, head_dim)
    on_device = isinstance(start_pos, torch.Tensor)
    if on_device and seqlen != 1:
        raise ValueError(f"attention: a start_pos tensor takes one query per sequence, got seqlen {seqlen}")
    if seqlen > 1 and not on_device and start_pos == 0:
        # A prompt from scratch: PyTorch's fused attention, which never builds the full score matrix.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)
    # The query heads that share a KV head become rows of one matrix, so K and V are never repeated per head.
    q = q.view(bs, seqlen, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(bs, n_kv_heads, group * seqlen, head_dim)  # row r is query position r % seqlen
    # In float32 (the KV slice converted once): on CPU, bfloat16 batched matmuls of shapes that change every
    # step cost far more than float32 BLAS (oneDNN builds a kernel per shape, ATen's own is slow).
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # (bs, n_kv, group*seqlen, kv_len)
    if seqlen > 1:
        q_pos = torch.arange(start_pos, start_pos + seqlen, device=q.device).repeat(group)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    elif on_device:
        scores = scores.masked_fill(torch.arange(kv_len, device=q.device) > start_pos, float("-inf"))
    out = torch.matmul(F.softmax(scores, dim=-1), v).to(dtype)  # (bs, n_kv_heads, group * seqlen, head_dim)
    out = out.view(bs, n_kv_heads, group, seqlen, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(bs, seqlen, n_heads, head_dim)
