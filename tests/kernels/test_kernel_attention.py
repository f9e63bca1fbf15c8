"""The Triton attention kernels equal the PyTorch fallback (in Triton's interpreter, or compiled on a GPU),
over shapes that catch tiling bugs; and the fallback equals a naive masked softmax(QK^T / sqrt(d)) V."""

import itertools
import math

import pytest
import torch
from kernel_device import DEVICE

from llama_kernels import fallback, triton_ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Kernel against fallback. The kernels round the (unnormalised) softmax probabilities to the input dtype
# before they meet V, as FlashAttention does; the fallback keeps them in float32. In bfloat16 the two
# differ by a few ulps of the output.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}


def make_inputs(bs, seqlen, start_pos, n_kv_heads, group, head_dim, dtype, heads_first=False, seed=0):
    """q, and k, v as the model passes them: (bs, kv_len, n_kv_heads, head_dim) views of a larger cache
    (more sequences, more positions), laid out positions-first or heads-first (bs, n_kv_heads, positions, hd)."""
    g = torch.Generator().manual_seed(seed)
    kv_len = start_pos + seqlen
    q = torch.randn(bs, seqlen, n_kv_heads * group, head_dim, generator=g).to(DEVICE, dtype)
    views = []
    for _ in range(2):
        values = torch.randn(bs, kv_len, n_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        # NaN wherever the kernel must not look: one stray read past kv_len or into another sequence shows.
        if heads_first:
            cache = torch.full((bs + 2, n_kv_heads, kv_len + 9, head_dim), float("nan"), dtype=dtype, device=DEVICE)
            cache[:bs, :, :kv_len] = values.transpose(1, 2)
            views.append(cache[:bs, :, :kv_len].transpose(1, 2))
        else:
            cache = torch.full((bs + 2, kv_len + 9, n_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
            cache[:bs, :kv_len] = values
            views.append(cache[:bs, :kv_len])
    k, v = views
    return q, k, v


def naive_attention(q, k, v, start_pos):
    """softmax(Q K^T / sqrt(d) + causal mask) V in float64, K and V repeated for every query head."""
    seqlen, n_heads, head_dim = q.shape[1:]
    group = n_heads // k.shape[2]
    k = k.double().repeat_interleave(group, dim=2)  # (bs, kv_len, n_heads, head_dim)
    v = v.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(head_dim)
    q_pos = torch.arange(start_pos, start_pos + seqlen, device=q.device)[:, None]
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def assert_matches_fallback(out, q, k, v, start_pos):
    expected = fallback.attention(q, k, v, start_pos)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[q.dtype])


def _cases(axes, cycled):
    """The full product of axes; the cycled axes take their values in turn, so each still shows up with
    every value of the others without multiplying the (slow, interpreted) cases."""
    cases = []
    for i, values in enumerate(itertools.product(*axes.values())):
        case = dict(zip(axes, values))
        for j, (name, options) in enumerate(cycled.items()):
            case[name] = options[(i // (j + 1)) % len(options)]
        cases.append(pytest.param(case, id="-".join(_id(name, value) for name, value in case.items())))
    return cases


def _id(name, value):
    if isinstance(value, torch.dtype):
        return next(key for key, dtype in DTYPES.items() if dtype == value)
    if name == "heads_first":
        return "heads-first" if value else "positions-first"
    return {"seqlen": "s", "start_pos": "pos", "group": "g", "head_dim": "hd"}.get(name, name) + str(value)


# Prefill: lengths of one tile, several tiles, and none a multiple of any block size (16, 32, 64, 128).
PREFILL = _cases(
    {"seqlen": [7, 33, 77, 130], "start_pos": [0, 19], "group": [1, 4, 8], "dtype": list(DTYPES.values())},
    {"head_dim": [64, 128], "bs": [1, 3], "heads_first": [False, True]},
)
# Decode: caches of 1 position (a fresh prompt of one token) up to several chunks of the split.
DECODE = _cases(
    {"start_pos": [0, 1, 7, 130, 300], "group": [1, 4, 8], "dtype": list(DTYPES.values())},
    {"head_dim": [64, 128], "bs": [1, 3], "heads_first": [False, True]},
)


@pytest.mark.parametrize("case", PREFILL)
def test_prefill_matches_fallback(case):
    q, k, v = make_inputs(n_kv_heads=2 if case["group"] == 1 else 1, **case)
    assert_matches_fallback(triton_ops.attention(q, k, v, case["start_pos"]), q, k, v, case["start_pos"])


@pytest.mark.parametrize("case", DECODE)
def test_decode_matches_fallback(case):
    q, k, v = make_inputs(seqlen=1, n_kv_heads=2 if case["group"] == 1 else 1, **case)
    assert_matches_fallback(triton_ops.attention(q, k, v, case["start_pos"]), q, k, v, case["start_pos"])


@pytest.mark.parametrize(
    "split_len, block_n", [(16, 16), (48, 16), (64, 16), (512, 16), (64, 64), (128, 64)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_split_into_chunks_matches_fallback(split_len, block_n, dtype):
    # 101 positions: the last chunk is ragged for every split length, and 512 leaves a single chunk;
    # tiles of 64 positions are the GPU's.
    q, k, v = make_inputs(3, 1, 100, 2, 4, 64, dtype, heads_first=True)
    out = triton_ops.attention_decode(q, k, v, 100, split_len=split_len, config=(block_n, 4, 1))
    assert_matches_fallback(out, q, k, v, 100)


@pytest.mark.parametrize(
    "block_m, block_n", [(16, 32), (64, 16), (128, 64)], ids=["m16-n32", "m64-n16", "m128-n64-gpu"]
)
@pytest.mark.parametrize("seqlen, start_pos", [(33, 0), (130, 19)], ids=["s33-pos0", "s130-pos19"])
def test_prefill_tilings_match_fallback(block_m, block_n, seqlen, start_pos):
    # Tiles of queries smaller and larger than tiles of keys, and the tiles used on a GPU.
    q, k, v = make_inputs(1, seqlen, start_pos, 1, 4, 64, torch.float16)
    out = triton_ops.attention_prefill(q, k, v, start_pos, config=(block_m, block_n, 4, 1))
    assert_matches_fallback(out, q, k, v, start_pos)


@pytest.mark.parametrize("seqlen", [1, 7])
def test_prefill_kernel_takes_a_single_query(seqlen):
    q, k, v = make_inputs(3, seqlen, 12, 2, 4, 64, torch.float32)
    assert_matches_fallback(triton_ops.attention_prefill(q, k, v, 12), q, k, v, 12)


@pytest.mark.parametrize("head_dim", [16, 40, 96], ids=lambda d: f"hd{d}")
@pytest.mark.parametrize("seqlen", [1, 9], ids=["decode", "prefill"])
def test_head_sizes_outside_llama_are_padded(head_dim, seqlen):
    # The tiny test model has head_dim 16; sizes no power of two fit are masked up to the next one.
    q, k, v = make_inputs(2, seqlen, 5, 2, 2, head_dim, torch.float32)
    assert_matches_fallback(triton_ops.attention(q, k, v, 5), q, k, v, 5)


def test_queries_may_be_strided():
    q, k, v = make_inputs(2, 9, 5, 2, 4, 64, torch.float32)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # batch-minor layout
    assert not q.is_contiguous()
    assert_matches_fallback(triton_ops.attention(q, k, v, 5), q, k, v, 5)


@pytest.mark.parametrize("seqlen, start_pos", [(1, 0), (1, 9), (7, 0), (7, 9), (33, 0), (33, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fallback_matches_naive_attention(seqlen, start_pos, dtype):
    # Each of the fallback's three paths: SDPA for a fresh prompt, the masked matmul, the unmasked decode.
    q, k, v = make_inputs(3, seqlen, start_pos, 2, 4, 64, dtype)
    out = fallback.attention(q, k, v, start_pos)
    exact = naive_attention(q, k, v, start_pos)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), exact, **tolerance)


def _bad(change):
    q, k, v = make_inputs(2, 3, 4, 2, 2, 16, torch.float32)
    args = {"q": q, "k": k, "v": v, "start_pos": 4}
    args.update(change(q, k, v))
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(lambda q, k, v: {"q": q[0]}), "takes q"),
        (_bad(lambda q, k, v: {"v": v[:, :3]}), "takes q"),
        (_bad(lambda q, k, v: {"k": k.half(), "v": v.half()}), "one dtype"),
        (_bad(lambda q, k, v: {"q": q.double(), "k": k.double(), "v": v.double()}), "float16, bfloat16"),
        (_bad(lambda q, k, v: {"q": q[:1]}), "in batch and head_dim"),
        (_bad(lambda q, k, v: {"q": q[:, :, :3]}), "multiple of n_kv_heads"),
        (_bad(lambda q, k, v: {"start_pos": 3}), "hold 7 positions"),
        (_bad(lambda q, k, v: {"start_pos": -1}), "non-negative int"),
        (_bad(lambda q, k, v: {"k": k.to("meta"), "v": v.to("meta")}), "one device"),
    ],
    ids=[
        "q-3d",
        "kv-shapes",
        "mixed-dtypes",
        "float64",
        "batch",
        "heads",
        "kv-length",
        "negative-start",
        "devices",
    ],
)
def test_attention_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        triton_ops.attention(**args)


def test_decode_rejects_a_split_that_is_not_whole_tiles():
    q, k, v = make_inputs(1, 1, 40, 1, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_ops.attention_decode(q, k, v, 40, split_len=24, config=(16, 4, 1))


@pytest.mark.parametrize("start_pos", [0, 37, 99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_with_the_position_in_a_tensor_reads_only_the_cache_up_to_it(start_pos, dtype):
    # The CUDA-graph form: k, v are the whole cache (100 positions) and the kernel reads the position; the
    # chunks past it hold no keys. Whatever the cache holds there (NaN for the kernel, which must not load
    # it; large values for the fallback, which masks their scores) must not leak in.
    q, k, v = make_inputs(3, 1, 99, 2, 4, 64, dtype, heads_first=True)
    upto = (q, k[:, : start_pos + 1], v[:, : start_pos + 1], start_pos)
    expected = fallback.attention(*upto)
    pos = torch.tensor([start_pos], device=DEVICE)
    k[:, start_pos + 1 :], v[:, start_pos + 1 :] = 1e4, 1e4
    torch.testing.assert_close(fallback.attention(q, k, v, pos), expected)
    k[:, start_pos + 1 :], v[:, start_pos + 1 :] = float("nan"), float("nan")
    for split_len in (None, 16 if DEVICE.type == "cpu" else 64):
        assert_matches_fallback(triton_ops.attention_decode(q, k, v, pos, split_len=split_len), *upto)
