"""Causal grouped-query attention over a KV cache as Triton kernels: flash-attention for prefill and
flash-decoding (a split KV sequence, then a reduction) for one new token; same results as llama_kernels.fallback.

q is (bs, seqlen, n_heads, head_dim) at positions start_pos .. start_pos + seqlen - 1; k and v are
(bs, start_pos + seqlen, n_kv_heads, head_dim) views of the cache, read through their strides, never copied.
Query head h reads KV head h // (n_heads // n_kv_heads).
"""

import math
from functools import cache
from typing import Optional

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # one (block, head_dim) tile of K and of V must fit in registers and shared memory
_LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are scaled by log2(e) / sqrt(head_dim)


@triton.jit
def _dot(a, b, acc, WIDEN: tl.constexpr):
    # float32 tiles multiply in IEEE precision, not TF32, to match PyTorch's float32 matmul. WIDEN is set
    # only in Triton's interpreter, which multiplies bfloat16 tiles as their raw 16-bit integers: the
    # widened product is the same, since a product of two bfloat16 numbers is exact in float32.
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # For head sizes a power of two (all of Llama's) the mask is a constant all-true, which the compiler
    # drops: tile loads stay unmasked along head_dim and vectorised.
    if HEAD_DIM == BLOCK_D:
        mask = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask = offs_d < HEAD_DIM
    return mask


@triton.jit
def _online_softmax_step(acc, m_i, l_i, qk, v, WIDEN: tl.constexpr):
    # One tile of keys: qk (rows, BLOCK_N) are log2-scaled scores, masked entries -inf. Every row has seen
    # at least one visible key by its first tile, so m_i is finite from then on and no row becomes NaN.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # The probabilities meet V in V's dtype, as in FlashAttention, so the product runs on tensor cores;
    # it accumulates in float32.
    acc = _dot(p.to(v.dtype), v, acc, WIDEN)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    n_heads,
    seqlen,
    start_pos,
    QK_SCALE: tl.constexpr,  # log2(e) / sqrt(head_dim): a constant, so it is float32 however launched
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIDEN: tl.constexpr,
):
    # One program: BLOCK_M consecutive queries of one head of one sequence. The last query blocks see the
    # most keys, so they are launched first and the short ones fill in behind them.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # int64: batch * stride passes 2**31 in a large cache
    h = pid_bh % n_heads
    kv_h = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_m = offs_m < seqlen

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kv_h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kv_len = start_pos + seqlen
    first_q = start_pos + pid_m * BLOCK_M  # absolute position of this block's first query
    q_pos = start_pos + offs_m
    # Keys 0 .. first_q are visible to every query of the block: whole tiles of them need no mask.
    unmasked_end = ((first_q + 1) // BLOCK_N) * BLOCK_N
    # The block's last query sees keys up to its own position; none exist past kv_len.
    end = tl.minimum(first_q + BLOCK_M, kv_len)

    for start_n in range(0, unmasked_end, BLOCK_N):
        kv_offs = (start_n + offs_n)[:, None]
        k = tl.load(k_base + kv_offs * stride_ks, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + kv_offs * stride_vs, mask=mask_d[None, :], other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), WIDEN) * QK_SCALE
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, WIDEN)

    for start_n in range(unmasked_end, end, BLOCK_N):
        kv_pos = start_n + offs_n
        kv_mask = (kv_pos < kv_len)[:, None] & mask_d[None, :]
        k = tl.load(k_base + kv_pos[:, None] * stride_ks, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_pos[:, None] * stride_vs, mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), WIDEN) * QK_SCALE
        # The causal mask, offset by the cache: query at absolute position p sees keys 0 .. p.
        visible = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos < kv_len)[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, WIDEN)

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    PartOut,
    PartLse,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    kv_len,
    StartPos,
    split_len,
    QK_SCALE: tl.constexpr,  # log2(e) / sqrt(head_dim): a constant, so it is float32 however launched
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIDEN: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr,
):
    # One program: the GROUP query heads that share one KV head, over one chunk of the sequence, so each
    # K and V tile is read once for the whole group. The query heads are the rows of a small matrix,
    # padded to BLOCK_H >= 16 rows for tl.dot.
    b = tl.program_id(0).to(tl.int64)
    kv_h = tl.program_id(1)
    split = tl.program_id(2)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    heads = kv_h * GROUP + offs_h

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kv_h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    if POS_ON_DEVICE:  # the query's position is read here, not passed at launch (CUDA graphs)
        kv_len = tl.load(StartPos).to(tl.int32) + 1
    # With the position passed at launch every chunk holds keys; read on the device, the chunks past it
    # hold none, and store a zero output with weight exp2(-inf) = 0.
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    for start_n in range(lo, hi, BLOCK_N):
        kv_pos = start_n + offs_n
        kv_mask = (kv_pos < hi)[:, None] & mask_d[None, :]
        k = tl.load(k_base + kv_pos[:, None] * stride_ks, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_pos[:, None] * stride_vs, mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), WIDEN) * QK_SCALE
        qk = tl.where((kv_pos < hi)[None, :], qk, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, WIDEN)

    # The chunk's normalised output and its log2-sum-exp2, which the reduction needs to weigh chunks. A chunk
    # with keys has a sum >= 1 (its largest term is exp2(0)); an empty one has 0 and stores 0 / 1.
    p_ptrs = PartOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
    tl.store(p_ptrs, acc / tl.maximum(l_i, 1.0)[:, None], mask=mask_h[:, None] & mask_d[None, :])
    tl.store(PartLse + b * stride_lb + heads * stride_lh + split, m_i + tl.math.log2(l_i), mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    PartOut,
    PartLse,
    Out,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    stride_od,
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One program per (sequence, query head): softmax-weighted sum of the chunks' outputs.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)

    lse_base = PartLse + b * stride_lb + h * stride_lh
    lse = tl.load(lse_base + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    total = tl.sum(tl.math.exp2(lse - lse_max), 0)  # padded chunks: exp2(-inf) = 0
    # One chunk at a time, so the registers hold one row of head_dim however many chunks there are.
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        weight = tl.math.exp2(tl.load(lse_base + s) - lse_max)
        part = tl.load(
            PartOut + b * stride_pb + h * stride_ph + s * stride_ps + offs_d, mask=mask_d, other=0.0
        )
        acc += weight * part
    out = acc / total
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=mask_d
    )


@cache
def _programs_wanted(device: torch.device) -> int:
    # Decode is bandwidth-bound: a couple of programs per SM keep every SM's loads in flight. On the CPU
    # (Triton's interpreter, for tests) a few programs are enough to exercise the split and the reduction.
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            "attention takes q (bs, seqlen, n_heads, head_dim) and k, v (bs, kv_len, n_kv_heads, head_dim), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"attention takes float16, bfloat16 or float32 with one dtype for q, k and v, got q {q.dtype}, "
            f"k {k.dtype}, v {v.dtype}; cast the KV cache to the model's dtype"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q on {q.device}, k on {k.device}, v on {v.device}; put them on one device"
        )
    bs, seqlen, n_heads, head_dim = q.shape
    kv_bs, kv_len, n_kv_heads, kv_head_dim = k.shape
    if kv_bs != bs or kv_head_dim != head_dim:
        raise ValueError(
            f"attention: k, v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim"
        )
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"attention: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    if isinstance(start_pos, torch.Tensor):
        if start_pos.numel() != 1 or start_pos.dtype != torch.long or start_pos.device != q.device or seqlen != 1:
            raise ValueError(
                "attention: a start_pos tensor must be one int64 on q's device, for one query per sequence; got "
                f"{start_pos.dtype} of shape {tuple(start_pos.shape)} on {start_pos.device}, seqlen {seqlen}"
            )
        # The position is read on the device: k, v may run past it (the whole cache).
    elif isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"attention: start_pos must be a non-negative int, got {start_pos!r}")
    elif kv_len != start_pos + seqlen:
        raise ValueError(
            f"attention: k, v hold {kv_len} positions but start_pos {start_pos} + seqlen {seqlen} = "
            f"{start_pos + seqlen}; pass the cache up to the last query, cache[:bs, :start_pos + seqlen]"
        )
    if not 0 < head_dim <= _MAX_HEAD_DIM:
        raise ValueError(
            f"attention: head_dim {head_dim} is outside 1..{_MAX_HEAD_DIM}, which these kernels support"
        )


def _widen(q: torch.Tensor) -> bool:
    # CPU tensors run only in Triton's interpreter, whose tl.dot mishandles bfloat16 (see _dot).
    return q.device.type != "cuda" and q.dtype == torch.bfloat16


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel."""
    if device.type != "cuda":
        # Triton's interpreter (tests): its cost is per tile, so tiles as large as still leave test
        # sequences of 33 and 130 queries spanning several.
        return 64, 32, 4, 1
    if dtype == torch.float32:
        # float32 runs on CUDA cores, whose tiles take many registers: these compile without spills (sm_90).
        return (32, 32, 4, 2) if head_dim <= 64 else (32, 16, 8, 2)
    # The fastest tiles of benchmarks/bench_kernels.py --sweep on an H100 (figures in the README); 128 x 64
    # for head_dim 128 also fits the shared memory of smaller GPUs.
    return (64, 64, 4, 3) if head_dim <= 64 else (128, 64, 8, 3)


def _decode_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the decode kernel."""
    return (64, 4, 3) if device.type == "cuda" else (16, 4, 1)


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int,
    config: Optional[tuple[int, int, int, int]] = None,
) -> torch.Tensor:
    """Flash-attention of seqlen new queries at start_pos over the cache.

    config (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the choice, for tests and benchmarks.
    """
    _check(q, k, v, start_pos)
    bs, seqlen, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or _prefill_config(head_dim, q.dtype, q.device)
    grid = (triton.cdiv(seqlen, block_m), bs * n_heads)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        n_heads,
        seqlen,
        start_pos,
        QK_SCALE=_LOG2E / math.sqrt(head_dim),
        GROUP=n_heads // n_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WIDEN=_widen(q),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int,
    split_len: Optional[int] = None,
    config: Optional[tuple[int, int, int]] = None,
) -> torch.Tensor:
    """Flash-decoding of one new query per sequence: chunks of the cache in parallel, then their reduction.

    start_pos may be a one-element int64 tensor on the GPU, read by the kernel: then k, v are the whole cache,
    the same shapes at every position, and a CUDA graph of the call serves every step. split_len (positions
    a chunk, a multiple of BLOCK_N) and config (BLOCK_N, num_warps, num_stages) override the choice, for
    tests and benchmarks.
    """
    _check(q, k, v, start_pos)
    bs, seqlen, n_heads, head_dim = q.shape
    if seqlen != 1:
        raise ValueError(
            f"attention_decode takes one query per sequence, got seqlen {seqlen}; use attention()"
        )
    kv_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    on_device = isinstance(start_pos, torch.Tensor)
    block_n, num_warps, num_stages = config or _decode_config(q.device)
    if split_len is None:
        # Enough chunks that bs * n_kv_heads * n_splits programs fill the device, each a whole number of tiles.
        splits_wanted = triton.cdiv(_programs_wanted(q.device), bs * n_kv_heads)
        split_len = triton.cdiv(triton.cdiv(kv_len, splits_wanted), block_n) * block_n
    elif split_len < 1 or split_len % block_n:
        raise ValueError(
            f"attention_decode: split_len must be a positive multiple of {block_n}, got {split_len}"
        )
    n_splits = triton.cdiv(kv_len, split_len)  # every chunk holds at least one key of k, v

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_d = _block_d(head_dim)
    part_out = torch.empty(bs, n_heads, n_splits, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bs, n_heads, n_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(bs, n_kv_heads, n_splits)](
        q,
        k,
        v,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(2),
        q.stride(3),
        *k.stride(),
        *v.stride(),
        *part_out.stride()[:3],
        *part_lse.stride()[:2],
        kv_len,
        start_pos if on_device else q,  # (q: a pointer the kernel ignores)
        split_len,
        QK_SCALE=_LOG2E / math.sqrt(head_dim),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        WIDEN=_widen(q),
        POS_ON_DEVICE=on_device,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_reduce_kernel[(bs, n_heads)](
        part_out,
        part_lse,
        out,
        *part_out.stride()[:3],
        *part_lse.stride()[:2],
        out.stride(0),
        out.stride(2),
        out.stride(3),
        n_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=max(16, triton.next_power_of_2(n_splits)),
        num_warps=4,
    )
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Causal GQA attention of q at start_pos over k, v: flash-decoding for one query, else flash-attention."""
    if q.dim() == 4 and q.shape[1] == 1:
        return attention_decode(q, k, v, start_pos)
    return attention_prefill(q, k, v, start_pos)
