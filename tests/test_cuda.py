"""On a CUDA GPU (skipped without one): the model with its Triton kernels compiled for the GPU gives
transformers' logits on the same weights, Llama.build puts everything on the GPU and generates the CPU's
greedy tokens, and the fast paths (int8, torch.compile, CUDA graphs) agree with the plain path there."""

import pytest
import torch
from generation_helpers import greedy, teacher_forced, write_tiny
from hf_reference import hf_model

import llama_kernels as kernels
from llama import Llama
from llama.checkpoint import build_transformer, model_args
from llama.fast import compile_decode, cuda_graph_decode
from llama.quantize import quantize_int8
from llama.tiny import random_state_dict, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# Llama 3 proportions at test size: head_dim 64 (the kernels' real tiles), four query heads per KV head.
PARAMS = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, multiple_of=64,
              ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)  # fmt: skip


def checkpoint(tmp_path, max_seq_len: int = 160):
    args = model_args(PARAMS, max_seq_len=max_seq_len, max_batch_size=3)
    state = random_state_dict(args, seed=1, std=0.15, dtype=torch.float32)
    write_checkpoint(tmp_path, PARAMS, state)
    return args, state


def test_float32_logits_on_the_gpu_match_transformers_on_the_cpu(tmp_path):
    args, state = checkpoint(tmp_path)
    ours = build_transformer(tmp_path, args, CUDA, torch.float32)
    assert kernels._use_triton(ours.tok_embeddings.weight)  # the compiled Triton kernels, not the fallbacks
    tokens = torch.randint(0, 300, (3, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(args, state, rope_factor=8.0)(tokens).logits.float()
    tokens = tokens.to(CUDA)
    # a prompt of 100, a chunk of 30 more at start_pos 100, then single tokens through the KV cache
    got = [ours(tokens[:, :100], 0), ours(tokens[:, 100:130], 100)]
    got += [ours(tokens[:, pos : pos + 1], pos) for pos in range(130, 150)]
    torch.testing.assert_close(torch.cat(got, dim=1).cpu(), expected, atol=1e-4, rtol=0)


def test_bfloat16_on_the_gpu_is_as_close_to_float32_as_on_the_cpu(tmp_path):
    # The GPU runs the Triton kernels, the CPU the PyTorch fallbacks; both round to bfloat16 and should
    # land about as far from the float32 model.
    args, _ = checkpoint(tmp_path)
    exact = build_transformer(tmp_path, args, torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, 300, (2, 120), generator=torch.Generator().manual_seed(1))

    def logits(model, tokens):  # a prompt of 100, then 20 single tokens
        steps = [model(tokens[:, :100], 0)] + [model(tokens[:, p : p + 1], p) for p in range(100, 120)]
        return torch.cat(steps, dim=1).cpu()

    want = logits(exact, tokens)
    errors = {}
    for device in ("cpu", "cuda"):
        got = logits(build_transformer(tmp_path, args, torch.device(device), torch.bfloat16), tokens.to(device))
        errors[device] = ((got - want).norm() / want.norm()).item()
    assert errors["cuda"] <= 1.5 * errors["cpu"] + 1e-3, errors


def test_llama_build_on_the_gpu_generates_the_greedy_tokens_of_the_cpu(tmp_path):
    path = write_tiny(tmp_path / "tiny")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    on_cpu = Llama.build(str(path), None, 64, 2, device="cpu", dtype="float32")
    on_gpu = Llama.build(str(path), None, 64, 2, device="cuda", dtype="float32")
    assert on_gpu.model.output.weight.is_cuda and on_gpu.model.layers[0].attention.cache_k.is_cuda
    expected, _ = on_cpu.generate(prompts, 30, temperature=0.0)
    assert on_gpu.generate(prompts, 30, temperature=0.0)[0] == expected
    # The default dtype on a GPU is bfloat16, and sampling runs there too.
    default = Llama.build(str(path), None, 64, 2, device="cuda")
    assert default.model.output.weight.dtype == torch.bfloat16
    tokens, logprobs = default.generate(prompts, 20, temperature=0.8, logprobs=True)
    assert [len(t) for t in tokens] == [len(p) for p in logprobs]


@pytest.mark.parametrize("quantize", [False, True], ids=["plain", "int8"])
def test_compiled_decode_on_the_gpu_gives_the_eager_logits(tmp_path, quantize):
    args, _ = checkpoint(tmp_path)
    sequence = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2)).to(CUDA)

    def build():
        model = build_transformer(tmp_path, args, CUDA, torch.float32)
        return quantize_int8(model) if quantize else model

    plain = teacher_forced(build(), sequence, 10)
    fast = teacher_forced(compile_decode(build()), sequence, 10)
    torch.testing.assert_close(fast, plain, atol=1e-4 * plain.std().item(), rtol=0)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


def test_int8_on_the_gpu_gives_the_int8_logits_of_the_cpu(tmp_path):
    # The same per-row int8 weights and scales, quantized on each device, multiplied in float32.
    args, _ = checkpoint(tmp_path)
    tokens = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(3))
    cpu = quantize_int8(build_transformer(tmp_path, args, torch.device("cpu"), torch.float32))(tokens, 0)
    gpu = quantize_int8(build_transformer(tmp_path, args, CUDA, torch.float32))(tokens.to(CUDA), 0)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_cuda_graphs_give_the_eager_greedy_tokens(tmp_path):
    # Recorded at the first decoding step, after the prompt is in the cache (which recording must not
    # disturb), then replayed at every later position; a second batch size records a graph of its own.
    args, _ = checkpoint(tmp_path)
    prompt = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(4)).to(CUDA)
    plain = build_transformer(tmp_path, args, CUDA, torch.float32)
    graphed = cuda_graph_decode(build_transformer(tmp_path, args, CUDA, torch.float32))
    for batch, prompt_len in ((3, 20), (1, 9), (3, 5)):
        expected_tokens, expected_logits = greedy(plain, prompt[:batch, :prompt_len], 40)
        tokens, logits = greedy(graphed, prompt[:batch, :prompt_len], 40)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    assert sorted(graphed.graphs) == [1, 3]


def test_llama_build_with_cuda_graphs_generates_the_plain_tokens(tmp_path):
    path = write_tiny(tmp_path / "tiny")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    plain = Llama.build(str(path), None, 64, 2, device="cuda", dtype="float32")
    fast = Llama.build(str(path), None, 64, 2, device="cuda", dtype="float32", compile=True)
    assert fast.generate(prompts, 40, temperature=0.0) == plain.generate(prompts, 40, temperature=0.0)
