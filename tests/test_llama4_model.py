"""Llama 4: the model's float32 logits equal transformers' Llama4ForCausalLM given the same weights, and the
invariants Meta's reference breaks hold here: chunked attention with the KV cache (decoding and prompts fed in
pieces equal one full prefill), bfloat16 with attention temperature tuning, sparse experts equal dense routing."""

import pytest
import torch
from hf_reference import hf_llama4

from llama.model import ModelArgs, Transformer

VOCAB = 256
# Scout's layout scaled down: MoE every layer, QK norm, scaled RoPE (factor 16, no smoothing band). A small
# chunk and floor_scale, so that chunking and temperature tuning act within a few dozen positions.
SCOUT = dict(
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=VOCAB,
    multiple_of=16,
    ffn_dim_multiplier=1.2,
    ffn_exp=4.0,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    rope_scaling_factor=16.0,
    rope_high_freq_factor=1.0,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=1),
    nope_layer_interval=4,
    use_qk_norm=True,
    attention_chunk_size=8,
    attn_temperature_tuning=True,
    floor_scale=4.0,
    attn_scale=0.1,
)
# Maverick's: dense and MoE layers alternating, no QK norm, plain RoPE.
MAVERICK = dict(
    SCOUT,
    use_scaled_rope=False,
    use_qk_norm=False,
    nope_layer_interval=2,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2),
)
CONFIGS = {"scout": SCOUT, "maverick": MAVERICK}
ATOL = 1e-4


def random_weights(args: ModelArgs, seed: int = 0, std: float = 0.15, dtype=torch.float32) -> dict:
    """Every parameter of the model, random: norms near 1, the router scaled up so that tokens spread over the
    experts, everything else normal(0, std)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("router_DE"):
            state[key] = torch.randn(shape, generator=g)
        elif key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = std * torch.randn(shape, generator=g)
    return {k: v.to(dtype) for k, v in state.items()}


def build(params: dict, state: dict, dtype=torch.float32, max_seq_len: int = 64, max_batch_size: int = 3):
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.setup_caches(torch.device("cpu"), dtype)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    params = CONFIGS[request.param]
    state = random_weights(ModelArgs(**params))
    ours = build(params, state)
    return params, state, ours, hf_llama4(ours.params, state)


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens, use_cache=False).logits.float()


def test_prefill_of_a_batch_across_chunks_matches_transformers(pair):
    params, state, ours, hf = pair
    tokens = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(0))  # ~4 chunks of 8
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(ours(tokens, 0), expected, atol=ATOL, rtol=0)
    # The check tells chunked from global attention: without chunks, the first chunk agrees and the rest not.
    unchunked = build(dict(params, attention_chunk_size=None), state)(tokens, 0)
    torch.testing.assert_close(unchunked[:, :8], expected[:, :8], atol=ATOL, rtol=0)
    assert (unchunked[:, 8:] - expected[:, 8:]).abs().max() > 100 * ATOL


def test_cached_decoding_and_a_prompt_in_pieces_match_one_full_prefill(pair):
    _, _, ours, hf = pair
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    # pieces that start and end inside chunks (5..13 crosses 8, 13..30 crosses 16 and 24), then one token at a
    # time across the chunk boundaries at 32
    got = [ours(tokens[:, :5], 0), ours(tokens[:, 5:13], 5), ours(tokens[:, 13:30], 13)]
    got += [ours(tokens[:, p : p + 1], p) for p in range(30, 40)]
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=ATOL, rtol=0)


def test_decoding_at_a_position_held_in_a_tensor_matches(pair):
    # The step CUDA graphs record: the position on the device, the whole (chunk-sized) cache read and masked.
    _, _, ours, hf = pair
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf, tokens)
    got = [ours(tokens[:, :13], 0)] + [ours(tokens[:, p : p + 1], torch.tensor([p])) for p in range(13, 30)]
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=ATOL, rtol=0)


def dense_moe(moe, x_bsD: torch.Tensor) -> torch.Tensor:
    """Meta's routing, spelled out: every expert on every token, the gates of experts not in the top k 0."""
    x_aD = x_bsD.reshape(-1, x_bsD.shape[-1])
    scores = x_aD @ moe.router_DE
    top = torch.topk(scores, moe.top_k, dim=1)
    gates = torch.sigmoid(torch.full_like(scores, float("-inf")).scatter(1, top.indices, top.values))
    w1, w2, w3 = moe.experts.w1, moe.experts.w2, moe.experts.w3
    x_eaD = x_aD[None] * gates.T[:, :, None]  # each expert's input, scaled by its gate
    routed = torch.bmm(torch.nn.functional.silu(torch.bmm(x_eaD, w1)) * torch.bmm(x_eaD, w3), w2).sum(0)
    return (moe.shared_expert(x_aD) + routed).view(x_bsD.shape), top.indices


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_experts_equal_dense_routing_and_routing_is_not_degenerate(top_k):
    params = dict(SCOUT, moe_args=dict(num_experts=4, top_k=top_k))
    model = build(params, random_weights(ModelArgs(**params)))
    moe = model.layers[0].feed_forward
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected, chosen = dense_moe(moe, x)
        torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)
    assert len(chosen.unique()) == 4  # the 60 tokens go to every expert, not all to one


def test_one_token_reads_only_the_expert_it_is_routed_to():
    # Every other expert's weights are NaN: any product with them (even scaled by a gate of 0) would show.
    model = build(SCOUT, random_weights(ModelArgs(**SCOUT)))
    moe = model.layers[0].feed_forward
    # each expert's matrices in nn.Linear's layout in memory, behind Meta's shapes
    assert moe.experts.w1.shape == (4, 64, 112) and moe.experts.w1[2].mT.is_contiguous()
    assert moe.experts.w2.shape == (4, 112, 64) and moe.experts.w2[2].mT.is_contiguous()
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected, chosen = dense_moe(moe, x)
        others = [e for e in range(4) if e != chosen.item()]
        for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            w[others] = float("nan")
        got = moe(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chunked_layers_keep_only_their_chunk_in_the_kv_cache():
    # Scout at 128K context: chunk 8192, every 4th layer global. The cache must take at most 0.3x the memory
    # of a full cache in every layer.
    params = dict(SCOUT, attention_chunk_size=8192)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params, max_seq_len=131072, max_batch_size=1))
        full = Transformer(ModelArgs(**dict(params, attention_chunk_size=None), max_seq_len=131072, max_batch_size=1))

    def cache_bytes(m):
        return sum(b.numel() * b.element_size() for n, b in m.named_buffers() if "cache" in n)

    assert cache_bytes(model) <= 0.3 * cache_bytes(full)
    assert [layer.attention.cache_k.shape[2] for layer in model.layers] == [8192, 8192, 8192, 131072]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_temperature_tuning_stays_near_float32(dtype):
    # Meta's reference multiplies the half-precision queries by a float32 scale and fails on the dtype mismatch.
    state = random_weights(ModelArgs(**SCOUT), std=0.05)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    reference = build(SCOUT, state)(tokens, 0)
    half = build(SCOUT, state, dtype=dtype)
    got = torch.cat([half(tokens[:, :30], 0)] + [half(tokens[:, p : p + 1], p) for p in range(30, 40)], dim=1)
    assert got.dtype == torch.float32
    # the stated bound: within 5% of the logits' spread, and the same argmax for most positions
    torch.testing.assert_close(got, reference, atol=0.05 * reference.std().item(), rtol=0)
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_compiled_decoding_across_chunk_boundaries_agrees_with_eager():
    # torch.compile of the decode step (compile=True on a CPU) through chunk boundaries, in bfloat16, where
    # inductor once miscompiled a chunk's first position (llama/fast.py). Dense layers: in half precision a
    # router near-tie can send a token to another expert, which would say nothing about attention.
    from llama.fast import compile_decode

    params = dict(SCOUT, moe_args=None, ffn_exp=None)
    state = random_weights(ModelArgs(**params))
    eager, compiled = build(params, state, torch.bfloat16), compile_decode(build(params, state, torch.bfloat16))
    tokens = torch.randint(0, VOCAB, (2, 28), generator=torch.Generator().manual_seed(6))
    for model in (eager, compiled):
        model(tokens[:, :10], 0)
    for p in range(10, 28):  # slots 2..7, 0..7, 0..3: every position of a chunk, the first included
        expected = eager(tokens[:, p : p + 1], p)
        got = compiled(tokens[:, p : p + 1], p)
        torch.testing.assert_close(got, expected, atol=0.1 * expected.std().item(), rtol=0)


def test_compiled_decoding_with_experts_gives_the_eager_logits():
    # float32, where compiled and eager agree to rounding (in half precision a router near-tie could send a
    # token elsewhere); the routed experts run eagerly between the compiled parts, whatever the routing.
    from llama.fast import compile_decode

    state = random_weights(ModelArgs(**SCOUT))
    eager, compiled = build(SCOUT, state), compile_decode(build(SCOUT, state))
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(7))
    for model in (eager, compiled):
        model(tokens[:, :10], 0)
    for p in range(10, 30):
        torch.testing.assert_close(compiled(tokens[:, p : p + 1], p), eager(tokens[:, p : p + 1], p), atol=ATOL, rtol=0)
