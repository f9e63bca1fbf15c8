"""A Llama 4 image prompt gives the same logits with the kernels forced to Triton (in the interpreter, or compiled on
a GPU) and to PyTorch: the prompt with its images (patch embeddings written over the <|patch|> tokens, which then
pass through the kernels' attention and RMSNorm like any other), then single-token decode steps."""

import pytest
import torch
from kernel_device import DEVICE

from llama.model import ModelArgs, Transformer

PATCH_ID = 300
VISION = dict(image_size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8}, dim=32, n_layers=2,
              n_heads=2, mlp_ratio=4.0, output_dim=48, pixel_shuffle_ratio=0.5)  # fmt: skip
ARGS = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=64, norm_eps=1e-5,
            rope_theta=500000.0, ffn_dim_multiplier=1.0, ffn_exp=2.0, moe_args=dict(num_experts=4, top_k=1),
            nope_layer_interval=2, use_qk_norm=True, attention_chunk_size=8, attn_temperature_tuning=True,
            floor_scale=4.0, vision_args=VISION, max_batch_size=2, max_seq_len=40)  # fmt: skip


def random_model(dtype: torch.dtype) -> Transformer:
    model = Transformer(ModelArgs(**ARGS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or (".ln_" in name and name.endswith(".weight")):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) * param.shape[-1] ** -0.5 * 2)
    return model.to(DEVICE, dtype)


def run(model: Transformer, backend: str, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    monkeypatch.setenv("LLAMA_KERNELS", backend)
    for layer in model.layers:
        layer.attention.cache_k.zero_()
        layer.attention.cache_v.zero_()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, PATCH_ID, (2, 30), generator=g)
    tokens[0, 3:11] = PATCH_ID  # an image of two tiles
    tokens[1, 9:13] = PATCH_ID  # one of one tile
    images = [torch.randn(n, 3, 32, 32, generator=g).to(DEVICE) for n in (2, 1)]
    tokens = tokens.to(DEVICE)
    logits = [model(tokens[:, :26], 0, images=images, image_mask=tokens[:, :26] == PATCH_ID)]
    for pos in range(26, 30):
        logits.append(model(tokens[:, pos : pos + 1], pos))
    return logits


def test_image_prompt_logits_are_the_same_with_triton_and_torch_kernels(model_parallel_group, monkeypatch):
    model = random_model(torch.float32)
    expected = run(model, "torch", monkeypatch)
    got = run(model, "triton", monkeypatch)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}: greedy tokens differ"
