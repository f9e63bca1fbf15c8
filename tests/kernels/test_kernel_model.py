"""The whole Transformer gives the same logits with the kernels forced to Triton (in the interpreter, or
compiled on a GPU) and to PyTorch: a batched prefill, a second piece of prompt at start_pos > 0, then
single-token decode steps; for Llama 3 and for Llama 4 (chunked attention whose pieces cross chunk boundaries,
a NoPE layer with temperature tuning, QK norm, experts)."""

import pytest
import torch
from kernel_device import DEVICE

from llama.model import ModelArgs, Transformer

# Llama-like proportions at a size the interpreter gets through: head_dim 64, four query heads per KV head.
ARGS = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=64, norm_eps=1e-5,
            rope_theta=500000.0, max_batch_size=3, max_seq_len=64)  # fmt: skip
LLAMA4 = dict(ARGS, ffn_dim_multiplier=1.0, ffn_exp=2.0, moe_args=dict(num_experts=4, top_k=1), nope_layer_interval=2,
              use_qk_norm=True, attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4.0)  # fmt: skip
CONFIGS = {"llama3": ARGS, "llama4": LLAMA4}


def random_model(dtype: torch.dtype, args: dict = ARGS) -> Transformer:
    model = Transformer(ModelArgs(**args))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=g))
            else:  # large enough that attention is far from uniform, so a wrong mask or head shows
                param.copy_(torch.randn(param.shape, generator=g) * ARGS["dim"] ** -0.5 * 2)
    return model.to(DEVICE, dtype)


def run(model: Transformer, backend: str, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    monkeypatch.setenv("LLAMA_KERNELS", backend)
    for layer in model.layers:  # a fresh cache for each backend
        layer.attention.cache_k.zero_()
        layer.attention.cache_v.zero_()
    tokens = torch.randint(0, ARGS["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits = [model(tokens[:, :13], 0), model(tokens[:, 13:20], 13)]  # a prompt, then more of it
    for pos in range(20, 24):  # decode, one token per sequence
        logits.append(model(tokens[:, pos : pos + 1], pos))
    return logits


@pytest.mark.parametrize("config", CONFIGS)
def test_float32_logits_are_the_same_with_triton_and_torch_kernels(model_parallel_group, monkeypatch, config):
    model = random_model(torch.float32, CONFIGS[config])
    expected = run(model, "torch", monkeypatch)
    got = run(model, "triton", monkeypatch)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}: greedy tokens differ"


@pytest.mark.parametrize("config", CONFIGS)
def test_bfloat16_logits_are_as_close_to_float32_with_triton_as_with_torch(model_parallel_group, monkeypatch, config):
    # In bfloat16 the paths round differently (the fallback keeps softmax probabilities in float32, the
    # kernels round them to bfloat16 before they meet V), so each is held against the float32 model.
    model = random_model(torch.bfloat16, CONFIGS[config])
    exact_model = random_model(torch.bfloat16, CONFIGS[config]).float()
    exact = run(exact_model, "torch", monkeypatch)
    with_torch = run(model, "torch", monkeypatch)
    with_triton = run(model, "triton", monkeypatch)
    for step, (t, p, e) in enumerate(zip(with_triton, with_torch, exact)):
        triton_error, torch_error = ((t - e).norm() / e.norm()).item(), ((p - e).norm() / e.norm()).item()
        # About 2% each; a wrong mask, head or tile would be tens of percent off.
        assert triton_error <= 1.5 * torch_error, (
            f"step {step}: triton {triton_error:.4f}, torch {torch_error:.4f}"
        )
