"""The fast paths give the plain path's greedy tokens: the float32 decode attention over the heads-first KV
cache (read in place, never repeated per head), torch.compile of the decode step (llama/fast.py), plain and
int8, and the step that CUDA graphs record (the position in a tensor), here on the CPU."""

import pytest
import torch
from generation_helpers import greedy, teacher_forced, write_tiny

from llama import Llama
from llama.fast import compile_decode
from llama.model import ModelArgs, Transformer
from llama.quantize import quantize_int8
from llama.tiny import random_state_dict
from llama_kernels import fallback

PARAMS = dict(
    dim=256,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=512,
    multiple_of=64,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(dtype: torch.dtype, std: float = 0.02, seed: int = 0, max_batch_size: int = 2) -> Transformer:
    args = ModelArgs(**PARAMS, max_seq_len=64, max_batch_size=max_batch_size)
    state = random_state_dict(args, seed=seed, std=std, dtype=dtype)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


def test_decode_attention_reads_the_kv_cache_in_place_at_any_batch_size():
    # float32: the fallback's decode path then converts nothing; heads-first cache views are matrices
    # that batched matmul reads directly, with no copy of K or V (nor one per query head).
    bs, kv_len, n_kv, group, hd = 3, 40, 2, 4, 16
    cache_k = torch.randn(bs + 1, n_kv, 64, hd)  # (max_batch, n_kv_heads, max_seq_len, head_dim)
    cache_v = torch.randn(bs + 1, n_kv, 64, hd)
    k, v = cache_k[:bs, :, :kv_len].transpose(1, 2), cache_v[:bs, :, :kv_len].transpose(1, 2)
    q = torch.randn(bs, 1, n_kv * group, hd)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = fallback.attention(q, k, v, kv_len - 1)
    copied = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not [s for s in copied if any(kv_len in shape for shape in s if isinstance(shape, list))], copied
    # against attention spelled out with K/V repeated per head
    keys = k.repeat_interleave(group, dim=2).transpose(1, 2)  # (bs, n_heads, kv_len, hd)
    values = v.repeat_interleave(group, dim=2).transpose(1, 2)
    probs = torch.softmax(q.transpose(1, 2) @ keys.transpose(2, 3) / hd**0.5, dim=-1)
    torch.testing.assert_close(out, (probs @ values).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_compiled_decode_gives_the_plain_greedy_tokens_in_float32():
    prompt = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    plain_tokens, plain_logits = greedy(build(torch.float32, std=0.5), prompt, 12)
    compiled = compile_decode(build(torch.float32, std=0.5))  # compiling takes 10-30 s on a 2-core CPU
    fast_tokens, fast_logits = greedy(compiled, prompt, 12)
    assert torch.equal(fast_tokens, plain_tokens)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=1e-4 * plain_logits.std().item())
    # a prompt again (eager), then decoding at other positions and another batch size
    again_tokens, _ = greedy(compiled, prompt[:1, :7], 5)
    assert torch.equal(again_tokens, greedy(build(torch.float32, std=0.5), prompt[:1, :7], 5)[0])


def test_compiled_decode_in_bfloat16_agrees_wherever_rounding_cannot_flip_the_token():
    # bfloat16 rounds differently once inductor fuses the ops, so compare step by step on one sequence:
    # logits within 5% of their spread, and the same argmax wherever the top two are further apart.
    sequence = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    plain = teacher_forced(build(torch.bfloat16), sequence, 10).float()
    fast = teacher_forced(compile_decode(build(torch.bfloat16)), sequence, 10).float()
    scale = plain.std().item()
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.05 * scale)
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
    assert clear.float().mean() > 0.5
    assert torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_compiled_int8_decode_agrees_with_eager_int8():
    # Under torch.compile the int8 layers multiply in one fused pass instead of ATen's int8 kernel.
    sequence = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(3))
    plain = teacher_forced(quantize_int8(build(torch.bfloat16, max_batch_size=1)), sequence, 10).float()
    compiled = compile_decode(quantize_int8(build(torch.bfloat16, max_batch_size=1)))
    fast = teacher_forced(compiled, sequence, 10).float()
    scale = plain.std().item()
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.05 * scale)
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * scale
    assert clear.float().mean() > 0.5
    assert torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_the_model_at_a_position_held_in_a_tensor_gives_the_plain_logits():
    # The step CUDA graphs record: the model's own forward reads the position from a tensor and attends over
    # the whole cache with the positions past it masked; here on the CPU, through the PyTorch fallback.
    model = build(torch.float32, std=0.5)
    prompt = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    plain_tokens, plain_logits = greedy(model, prompt, 12)
    logits = [model(prompt, 0, last_only=True)]  # the prompt as generation feeds it, then the tensor path
    tokens = [logits[-1][:, -1].argmax(-1, keepdim=True)]
    for pos in range(10, 21):
        with torch.inference_mode():
            logits.append(model(tokens[-1], torch.tensor([pos])))
        tokens.append(logits[-1][:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1), plain_tokens)
    torch.testing.assert_close(torch.cat(logits, dim=1), plain_logits, rtol=0, atol=1e-4)


def test_llama_build_with_compile_on_the_cpu_generates_the_plain_tokens(tmp_path):
    path = write_tiny(tmp_path / "tiny")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    plain = Llama.build(str(path), None, 64, 2, device="cpu", dtype="float32")
    fast = Llama.build(str(path), None, 64, 2, device="cpu", dtype="float32", compile=True)
    assert plain.decode_step is plain.model and fast.decode_step is not fast.model  # llama.fast.compile_decode's
    assert "forward" not in vars(fast.model)  # the model itself is left as it is: a step of its own runs it
    assert fast.generate(prompts, 20, temperature=0.0) == plain.generate(prompts, 20, temperature=0.0)
    with pytest.raises(ValueError, match="compile must be True or False"):
        Llama.build(str(path), None, 64, 2, device="cpu", compile="yes")
