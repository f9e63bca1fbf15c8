"""The model's float32 logits equal Hugging Face transformers' LlamaForCausalLM given the same weights."""

import pytest
import torch
from hf_reference import hf_model

from llama.args import model_args
from llama.checkpoint import build_transformer
from llama.model import precompute_freqs_cis
from llama.tiny import random_state_dict, write_checkpoint

CONFIGS = {
    # Llama 2: multi-head attention, no rope_theta in params.json (10000), no ffn_dim_multiplier
    "llama2-mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, norm_eps=1e-5),
    # Llama 3: grouped-query attention, rope_theta 500000, ffn_dim_multiplier
    "llama3-gqa": dict(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=300,
        multiple_of=32,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    # Llama 3.1: Meta's frequency scaling (factor 8), on a head size where it shows at short positions
    "llama3.1-scaled": dict(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        multiple_of=32,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    ),
}
ATOL = 1e-4


def build_pair(tmp_path, params: dict, max_seq_len: int = 320, tied: bool = False, hf_rope_factor: float = 8.0):
    args = model_args(params, max_seq_len=max_seq_len, max_batch_size=4)
    # std 0.15: attention scores large enough that positions (RoPE) change the logits markedly
    state = random_state_dict(args, seed=1, std=0.15, dtype=torch.float32, tied=tied)
    write_checkpoint(tmp_path, params, state)
    ours = build_transformer(tmp_path, args, torch.device("cpu"), torch.float32)
    return ours, hf_model(args, state, rope_factor=hf_rope_factor)


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits.float()


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_of_a_batch_matches_transformers(tmp_path, name):
    ours, hf = build_pair(tmp_path, CONFIGS[name])
    tokens = torch.randint(0, 300, (3, 150), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf, tokens)
    got = ours(tokens, 0)
    assert got.dtype == torch.float32 and got.shape == (3, 150, 300)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(tokens, 0, last_only=True), expected[:, -1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_with_the_kv_cache_matches_transformers(tmp_path, name):
    ours, hf = build_pair(tmp_path, CONFIGS[name])
    tokens = torch.randint(0, 300, (2, 140), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    # a prompt of 100, a chunk of 30 more at start_pos 100, then ten single tokens
    torch.testing.assert_close(ours(tokens[:, :100], 0), expected[:, :100], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(tokens[:, 100:130], 100), expected[:, 100:130], atol=ATOL, rtol=0)
    for pos in range(130, 140):
        torch.testing.assert_close(ours(tokens[:, pos : pos + 1], pos), expected[:, pos : pos + 1], atol=ATOL, rtol=0)


def test_tied_embeddings_match_transformers_and_share_storage(tmp_path):
    ours, hf = build_pair(tmp_path, CONFIGS["llama3-gqa"], tied=True)
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(tokens, 0), hf_logits(hf, tokens), atol=ATOL, rtol=0)


LLAMA_32_SHAPES = {
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8),
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8),
}


@pytest.mark.parametrize("size", LLAMA_32_SHAPES)
def test_llama_32_small_models_use_rope_factor_32_like_hf_configs(size):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The factor is decided where params.json is read (llama.args.model_args), then explicit in ModelArgs.
    args = model_args(dict(**LLAMA_32_SHAPES[size], vocab_size=128256, rope_theta=500000.0, use_scaled_rope=True))
    assert args.rope_scaling_factor == 32.0
    config = LlamaConfig(
        hidden_size=args.dim,
        num_attention_heads=args.n_heads,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = precompute_freqs_cis(args.dim // args.n_heads, 2, args.rope_theta, (32.0, 4.0))
    torch.testing.assert_close(torch.atan2(ours[1, :, 1], ours[1, :, 0]), inv_freq.float(), rtol=1e-6, atol=0)
    # An 8B-shaped model keeps Meta's factor 8, and params.json's rope_scaling_factor overrides either.
    assert model_args(dict(dim=4096, n_layers=32, use_scaled_rope=True)).rope_scaling_factor == 8.0
    assert model_args(dict(**LLAMA_32_SHAPES[size], use_scaled_rope=True, rope_scaling_factor=8.0)).rope_scaling_factor == 8.0


def test_scaled_rope_model_with_factor_32_matches_transformers_and_factor_8_does_not(tmp_path):
    params = dict(CONFIGS["llama3.1-scaled"], rope_scaling_factor=32.0)
    ours, hf = build_pair(tmp_path, params, hf_rope_factor=32.0)
    tokens = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(3))
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(ours(tokens, 0), expected, atol=ATOL, rtol=0)
    # The same weights with the other factor give other logits: the check above can tell them apart.
    wrong, _ = build_pair(tmp_path / "f8", dict(params, rope_scaling_factor=8.0), hf_rope_factor=32.0)
    assert (wrong(tokens, 0) - expected).abs().max() > 100 * ATOL
