"""int8 weight-only quantization (llama/quantize.py): the quantized model stays within a stated bound of
the plain one, every linear layer is swapped and reads half the bytes, the fast CPU kernel agrees with
dequantize-then-multiply, and the swapped layers keep fairscale's model-parallel communication.

Bound (float32 and bfloat16 models, weights of std 0.02 as in trained Llamas): over every position of a
batch of prompts, max |logit difference| <= 0.1 x the logits' standard deviation, root-mean-square
difference <= 0.02 x it, and the argmax (greedy token) the same at >= 95% of positions. Measured: max
0.03-0.05, rms 0.007-0.008, 98-100% equal, about as far as bfloat16 rounding alone moves float32 logits.
"""

import sys
from pathlib import Path

import pytest
import torch
from distributed import torchrun
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from generation_helpers import one_thread  # noqa: F401 (a fixture, used by pytestmark)

import llama.quantize
from llama.model import ModelArgs, Transformer
from llama.quantize import Int8Linear, quantize_int8, quantize_rows
from llama.tiny import random_state_dict

PARAMS = dict(
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=512,
    multiple_of=64,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)
MAX_DIFF, RMS_DIFF, AGREE = 0.1, 0.02, 0.95


pytestmark = pytest.mark.usefixtures("one_thread")  # generation_helpers': tiny products on a shared machine


def build(state: dict, dtype: torch.dtype, max_seq_len: int = 128, max_batch_size: int = 2) -> Transformer:
    args = ModelArgs(**PARAMS, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


def weights(seed: int = 0, std: float = 0.02) -> dict:
    return random_state_dict(ModelArgs(**PARAMS), seed=seed, std=std, dtype=torch.float32)


def test_rows_round_trip_within_half_a_step_of_their_own_scale():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 1, 64)[:, None]
    w[3] = 0  # an all-zero row must not divide by zero
    for dtype in (torch.float32, torch.bfloat16):
        q, scales = quantize_rows(w.to(dtype), dtype)
        assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (64,)
        assert q.abs().max() <= 127 and (q[3] == 0).all()
        assert (q.abs().amax(dim=1)[torch.arange(64) != 3] >= 126).all()  # the range is used
        s = scales.float()[:, None]
        err = (q.float() * s - w.to(dtype).float()).abs()
        assert (err <= 0.501 * s).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_logits_stay_within_the_stated_bound(dtype):
    state = weights(seed=1)
    tokens = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(1))
    plain = build(state, dtype)(tokens, 0)
    quantized = quantize_int8(build(state, dtype))(tokens, 0)
    scale = plain.std()
    diff = quantized - plain
    assert diff.abs().max() <= MAX_DIFF * scale
    assert diff.pow(2).mean().sqrt() <= RMS_DIFF * scale
    assert (quantized.argmax(-1) == plain.argmax(-1)).float().mean() >= AGREE
    # and it is not the plain model: the test above could tell them apart
    assert diff.abs().max() > 1e-3 * scale


def test_every_linear_layer_becomes_int8_and_the_bytes_per_token_halve():
    model = build(weights(), torch.bfloat16)
    embedding = model.tok_embeddings.weight

    def linear_bytes(m):
        return sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n.endswith(("weight", "scales")))

    plain_bytes = sum(
        mod.weight.numel() * mod.weight.element_size()
        for mod in model.modules()
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear))
    )
    quantize_int8(model)
    assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(names) == 7 * PARAMS["n_layers"] + 1 and "output" in names
    assert model.tok_embeddings.weight is embedding and embedding.dtype == torch.bfloat16  # a lookup, untouched
    q_bytes = linear_bytes(model)
    assert q_bytes < 0.51 * plain_bytes
    state = model.state_dict()
    assert state["layers.0.attention.wq.weight"].dtype == torch.int8
    assert state["layers.0.feed_forward.w2.scales"].shape == (PARAMS["dim"],)


def decode_teacher_forced(model: Transformer, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (bs, steps, vocab) of each position after the prompt, fed one token at a time as generation does."""
    logits = [model(sequence[:, :prompt_len], 0, last_only=True)]
    for pos in range(prompt_len, sequence.shape[1] - 1):
        logits.append(model(sequence[:, pos : pos + 1], pos, last_only=True))
    return torch.cat(logits, dim=1)


def assert_same_greedy_tokens(fast: torch.Tensor, plain: torch.Tensor, tolerance: float) -> None:
    """Same argmax wherever the plain logits' top two are further apart than rounding could move them;
    logits within `tolerance` x their standard deviation everywhere."""
    scale = plain.std()
    torch.testing.assert_close(fast, plain, rtol=0, atol=tolerance * scale.item())
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tolerance * scale
    assert clear.float().mean() > 0.5  # the check below is not vacuous
    assert torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_cpu_int8_kernel_gives_the_greedy_tokens_of_dequantize_then_multiply(monkeypatch):
    # Decoding (one token per sequence) in bfloat16 on CPU takes ATen's int8 kernel; the plain arithmetic
    # it stands for is dequantize, then multiply. Both decode the same sequence, one token at a time.
    model = quantize_int8(build(weights(seed=2), torch.bfloat16))
    sequence = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    fast = decode_teacher_forced(model, sequence, 24)
    calls = []

    def dequantize_then_multiply(x, weight, scales):
        calls.append(x.shape)
        return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales

    monkeypatch.setattr(torch, "_weight_int8pack_mm", dequantize_then_multiply)
    plain = decode_teacher_forced(model, sequence, 24)
    # every layer at each of the 15 decode steps, and the prompt's last-position output projection
    assert len(calls) == 15 * (7 * PARAMS["n_layers"] + 1) + 1
    assert_same_greedy_tokens(fast.float(), plain.float(), tolerance=0.05)


# -- Model parallelism: two ranks under torchrun -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_quantize_their_shards_and_keep_the_communication(tmp_path):
    from llama.tiny import write_checkpoint

    state = weights(seed=4)
    write_checkpoint(tmp_path / "ckpt", PARAMS, state, n_shards=2)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun(2, [str(tmp_path / "ckpt"), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")], Path(__file__))
    two_ranks = torch.load(tmp_path / "logits.pt", weights_only=True)
    plain = build(state, torch.float32)(tokens, 0)
    one_rank = quantize_int8(build(state, torch.float32))(tokens, 0)
    # Column-parallel rows are quantized as on one rank; a row-parallel shard gets its own scale per row,
    # so the two quantized models differ a little, and both stay within the bound of the plain model.
    scale = plain.std()
    assert (two_ranks - plain).abs().max() <= MAX_DIFF * scale
    assert (two_ranks - one_rank).abs().max() <= MAX_DIFF * scale
    assert (two_ranks.argmax(-1) == plain.argmax(-1)).float().mean() >= AGREE


def _rank_main(ckpt_dir: str, tokens_path: str, out_path: str) -> None:
    """Under torchrun: load this rank's shard in float32, quantize it, save rank 0's logits."""
    from llama.checkpoint import build_transformer, model_args, read_params
    from llama.generation import init_distributed

    tokens = torch.load(tokens_path, weights_only=True)
    rank, world = init_distributed(None, torch.device("cpu"))
    args = model_args(read_params(ckpt_dir), max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0])
    model = quantize_int8(build_transformer(ckpt_dir, args, torch.device("cpu"), torch.float32, rank, world))
    logits = model(tokens, 0)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_dequantize_block_by_block_into_one_buffer(monkeypatch, dtype):
    # A weight of 10 blocks of rows (the last one short), converted into the buffer in turn, gives the
    # product with the whole weight converted at once, and reuses the buffer rather than allocating.
    monkeypatch.setattr(llama.quantize, "SCRATCH_ELEMENTS", 64 * 96)
    weight = torch.randint(-127, 128, (611, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(6)).to(dtype)
    scratch = {}
    got = llama.quantize.dequantize_in_blocks_matmul(x, weight, scratch)
    buffer = scratch[dtype]
    assert got.shape == (3, 7, 611)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight.to(dtype)), rtol=1e-6, atol=1e-5)
    llama.quantize.dequantize_in_blocks_matmul(x, weight, scratch)
    assert scratch[dtype] is buffer and buffer.numel() == 64 * 96


def test_each_quantized_model_has_its_own_buffer_freed_with_it():
    # No module-level state: two models never share the prompts' conversion buffer (nor a thread's
    # model another's), and a model's buffer goes when the model does.
    import gc
    import weakref

    state = weights(seed=7)
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(7))
    a, b = quantize_int8(build(state, torch.bfloat16)), quantize_int8(build(state, torch.bfloat16))
    a(tokens, 0), b(tokens, 0)
    buffers = [
        {id(m.scratch[torch.bfloat16]) for m in model.modules() if isinstance(m, Int8Linear)} for model in (a, b)
    ]
    assert len(buffers[0]) == len(buffers[1]) == 1 and buffers[0] != buffers[1]
    freed = weakref.ref(a.output.scratch[torch.bfloat16])
    del a
    gc.collect()
    assert freed() is None


LLAMA4 = dict(PARAMS, ffn_exp=2.0, ffn_dim_multiplier=1.2, moe_args=dict(num_experts=4, top_k=1), nope_layer_interval=4,
              use_qk_norm=True, attention_chunk_size=32, attn_temperature_tuning=True, floor_scale=16.0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_experts_become_int8_and_stay_within_the_stated_bound(dtype):
    # The experts hold most of a Llama 4's weights; the router stays as it is (it picks, it is not multiplied
    # through), so tokens go to the experts they went to before.
    args = ModelArgs(**LLAMA4, max_seq_len=128, max_batch_size=2)
    state = random_state_dict(args, seed=2, std=0.02, dtype=torch.float32)
    with torch.device("meta"):
        plain, quantized = Transformer(args), Transformer(args)
    for model in (plain, quantized):
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.setup_caches(torch.device("cpu"), dtype)
    quantize_int8(quantized)
    experts = [layer.feed_forward.experts for layer in quantized.layers]
    assert all(isinstance(e, llama.quantize.Int8Experts) for e in experts)
    assert all(e.w1.dtype == e.w2.dtype == e.w3.dtype == torch.int8 for e in experts)
    tokens = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(2))
    expected = plain(tokens[:, :90], 0)
    got = quantized(tokens[:, :90], 0)  # a prompt, then decoding (ATen's int8 kernel for the experts)
    expected = torch.cat([expected] + [plain(tokens[:, p : p + 1], p) for p in range(90, 100)], dim=1)
    got = torch.cat([got] + [quantized(tokens[:, p : p + 1], p) for p in range(90, 100)], dim=1)
    scale, diff = expected.std(), got - expected
    assert diff.abs().max() <= MAX_DIFF * scale
    assert diff.pow(2).mean().sqrt() <= RMS_DIFF * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= AGREE
    assert diff.abs().max() > 1e-3 * scale
