"""Llama 4 checkpoints: Meta's released layout (fused wqkv and fc1, flat experts, packed norm names), as Meta's own
load hooks and resharding read it, loads to the logits of the same weights under the model's names, on any
model-parallel size that divides or is divided by the shard count; skipped keys say so once; Hugging Face's
Llama4ForCausalLM and Llama4ForConditionalGeneration folders give transformers' logits."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from distributed import torchrun_logits_many

from llama.args import ModelArgs, config_params, model_args
from llama.checkpoint import build_transformer, load_state_dict, read_params
from llama.checkpoint_llama4 import FLAT_EXPERTS, RENAMED
from llama.tiny import (
    TINY_LLAMA4_PARAMS,
    random_state_dict,
    shard_state_dict,
    write_byte_tokenizer,
    write_checkpoint,
)

# Eight heads over four KV heads, so that four ranks can share them; dense and MoE layers alternate.
# Text only: a byte tokenizer has no image tokens (tests/test_llama4_vision.py loads the vision tower).
PARAMS = dict(TINY_LLAMA4_PARAMS, n_heads=8, n_kv_heads=4, head_dim=8, vocab_size=512, vision_args=None)
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")
ATOL = 1e-4
SHARDS = (1, 2, 4)


def args_for(params: dict) -> ModelArgs:
    return model_args(params, max_seq_len=TOKENS.shape[1], max_batch_size=TOKENS.shape[0])


def logits(folder, args: ModelArgs) -> torch.Tensor:
    return build_transformer(folder, args, CPU, torch.float32)(TOKENS, 0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(args, unsharded state, {"modules" or n shards in the released layout: folder})."""
    root = tmp_path_factory.mktemp("llama4")
    args = args_for(PARAMS)
    state = random_state_dict(args, seed=1, std=0.15, dtype=torch.float32)
    folders = {"modules": root / "modules"}
    write_checkpoint(folders["modules"], PARAMS, state)
    for n in SHARDS:
        folders[n] = root / f"released-{n}"
        write_checkpoint(folders[n], PARAMS, state, n, released=True)
    for folder in folders.values():
        write_byte_tokenizer(folder / "tokenizer.model")
    return args, state, folders


@pytest.fixture(scope="module")
def reference(ckpt):
    args, _, folders = ckpt
    return logits(folders["modules"], args)


def test_the_released_layout_holds_every_fused_and_flat_name(ckpt):
    _, _, folders = ckpt
    keys = torch.load(folders[2] / "consolidated.00.pth", weights_only=True, mmap=True).keys()
    names = {key.split(".", 2)[2] for key in keys if key.startswith("layers.")}
    assert set(RENAMED) | set(FLAT_EXPERTS) | {"attention.wqkv.weight", "feed_forward.mlp.fc1_weight"} <= names
    assert not names & {"attention.wq.weight", "attention_norm.weight", "ffn_norm.weight", "feed_forward.experts.w1"}


def _meta_hooks(state: dict, args: ModelArgs) -> dict:
    """Meta's reference load hooks (llama_models.llama4) applied as its modules would apply them, parent first."""
    from llama_models.llama4.ffn import FeedForward
    from llama_models.llama4.model import Attention, TransformerBlock
    from llama_models.llama4.moe import Experts, MoE

    state = dict(state)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        hook_args = ({}, True, [], [], [])
        TransformerBlock.load_hook(None, state, p, *hook_args)
        heads = SimpleNamespace(n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
        Attention.load_hook(heads, state, p + "attention.", *hook_args)
        if args.is_moe_layer(i):
            MoE.load_hook(None, state, p + "feed_forward.", *hook_args)
            experts = SimpleNamespace(num_local_experts=args.moe_args.num_experts, dim=args.dim)
            Experts.load_hook(experts, state, p + "feed_forward.experts.", *hook_args)
        else:
            FeedForward.load_hook(None, state, p + "feed_forward.", *hook_args)
    return state


@pytest.mark.parametrize("n", (1, 2))
def test_metas_own_loader_reads_the_released_layout_as_the_module_names(ckpt, n):
    # The witness for the writer: Meta's resharding (llama_models.checkpoint, 2 shards merged) and load hooks.
    from llama_models.checkpoint import convert_moe_weights, reshard_mp

    args, state, folders = ckpt
    shards = [torch.load(p, weights_only=True) for p in sorted(folders[n].glob("consolidated.*.pth"))]
    if n > 1:
        shards = [convert_moe_weights(s, args.moe_args.num_experts) for s in shards]
        merged = reshard_mp(shards, size=1, rank=0)
    else:
        merged = shards[0]
    unfused = _meta_hooks(merged, args)
    assert set(unfused) == set(state)
    for key, tensor in state.items():
        assert torch.equal(unfused[key], tensor), key


@pytest.mark.parametrize("world", (1, 2, 4))
@pytest.mark.parametrize("source", (*SHARDS, "modules"))
def test_every_rank_gets_exactly_its_share_of_every_weight(ckpt, source, world):
    args, state, folders = ckpt
    expected = shard_state_dict(state, world)  # experts split along F, as the reference shards them
    for rank in range(world):
        got = load_state_dict(folders[source], args, rank, world)
        assert set(got) == set(expected[rank])
        for key, tensor in expected[rank].items():
            assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("n", SHARDS)
def test_the_released_layout_gives_the_logits_of_the_module_names(ckpt, reference, n):
    args, _, folders = ckpt
    torch.testing.assert_close(logits(folders[n], args), reference, atol=1e-5, rtol=0)


def test_a_rank_keeps_views_of_the_mapped_file_when_it_splits_a_shard(ckpt):
    # wqkv's and the flat experts' pieces are views of the file, as plain weights are: no copy of the shard.
    args, _, folders = ckpt
    got = load_state_dict(folders[1], args, rank=1, world=2)
    shard = torch.load(folders[1] / "consolidated.00.pth", weights_only=True, mmap=True)
    for key, fused in (
        ("layers.0.attention.wk.weight", "layers.0.attention.wqkv.weight"),
        ("layers.1.feed_forward.experts.w2", "layers.1.feed_forward.experts.moe_w_out_eF_D"),
    ):
        assert got[key].untyped_storage().nbytes() == shard[fused].untyped_storage().nbytes()


# --- keys that are skipped, and keys that are not known ---------------------------------------------------------


def _with_extra_keys(folder, extra):
    for path in sorted(folder.glob("consolidated.*.pth")):
        shard = torch.load(path, weights_only=True)
        torch.save({**shard, **extra}, path)


def test_a_text_only_build_skips_vision_weights_and_router_statistics_with_one_line_each(ckpt, reference, tmp_path):
    # The same weights, with a vision tower (drawn after the text model's from the same generator) and its vision_args
    params = dict(PARAMS, vision_args=TINY_LLAMA4_PARAMS["vision_args"])
    state = random_state_dict(args_for(params), seed=1, std=0.15, dtype=torch.float32)
    write_checkpoint(tmp_path, params, state, 2, released=True)
    write_byte_tokenizer(tmp_path / "tokenizer.model")
    extra = {"layers.0.attention.wqkv._extra_state": torch.zeros(0)}  # training bookkeeping: dropped quietly
    for i in (1, 3):  # the MoE layers
        for name in ("global_gate_stats_3E", "running_gate_stats_3E"):
            extra[f"layers.{i}.feed_forward.{name}"] = torch.zeros(3, 4)
        extra[f"layers.{i}.feed_forward.expert_activation_DE"] = torch.zeros(64, 4)
    _with_extra_keys(tmp_path, extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = read_params(tmp_path)
        args = model_args(params, max_seq_len=TOKENS.shape[1], max_batch_size=TOKENS.shape[0], vision_args=None)
        out = logits(tmp_path, args)  # both shards read onto one rank: still one line per kind
    lines = [str(w.message) for w in caught]
    assert len(lines) == 2, lines
    assert sum("vision tower" in line and "parameters on each rank" in line for line in lines) == 1
    assert sum("router statistics" in line for line in lines) == 1
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"layers.1.feed_forward.experts.moe_w_mystery_eD_F": torch.zeros(2)}, "moe_w_mystery_eD_F"),
        ({"vision_tower.weight": torch.zeros(2)}, "vision_tower.weight"),
        ({"layers.0.attention_norm.weight": torch.ones(64)}, "both 'layers.0.attention.wqkv.layer_norm_weight' and"),
    ],
    ids=["unknown-layer-key", "unknown-top-key", "two-names-for-one-weight"],
)
def test_a_key_that_is_not_used_fails_naming_it(ckpt, tmp_path, extra, match):
    _, state, _ = ckpt
    write_checkpoint(tmp_path, PARAMS, state, released=True)
    _with_extra_keys(tmp_path, extra)
    with pytest.raises(ValueError, match=match):
        logits(tmp_path, args_for(PARAMS))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(moe_args=dict(PARAMS["moe_args"], num_experts=8)), r"moe_w_in_eD_F' has shape \(256, 112\).*8 experts"),
        (dict(n_kv_heads=2), r"wqkv.weight' has shape \(128, 64\).*n_heads 8 \+ 2 \* n_kv_heads 2"),
    ],
)
def test_params_json_of_another_shape_names_the_fused_key(ckpt, change, match):
    _, _, folders = ckpt
    with pytest.raises(ValueError, match=match):
        load_state_dict(folders[1], args_for(dict(PARAMS, **change)))


def test_experts_hidden_size_that_ranks_cannot_share(ckpt):
    args, _, folders = ckpt
    # 112 / 8 = 14 per rank is fine, but n_kv_heads 4 is not: the message lists the sizes that work
    with pytest.raises(ValueError, match=r"n_kv_heads=4 is not divisible by model_parallel_size=8.*among 1, 2, 4$"):
        load_state_dict(folders[4], args, rank=0, world=8)


# --- Hugging Face folders -------------------------------------------------------------------------------------

HF_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=48,  # the experts' F; neither it nor 100 is what Meta's rules give for the tiny params
    intermediate_size_mlp=100,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    no_rope_layer_interval=4,
    attention_chunk_size=8,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=8,
    rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=16.0,
        low_freq_factor=1.0,
        high_freq_factor=1.0,
        original_max_position_embeddings=8192,
    ),
)


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise if "router" in name else 0.15 * noise)


def _hf_folder(path, conditional: bool):
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers doubts high_freq_factor 1, which is Scout's
        if conditional:
            vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
            vision |= dict(image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64)
            config = Llama4Config(text_config=HF_TEXT, vision_config=dict(vision, projector_output_dim=64))
            model = Llama4ForConditionalGeneration(config)
        else:
            model = Llama4ForCausalLM(Llama4TextConfig(**HF_TEXT, attn_implementation="eager"))
    model.config._attn_implementation = "eager"
    if conditional:
        model.config.text_config._attn_implementation = "eager"
    model = model.float().eval()
    _randomise(model, seed=2)
    model.save_pretrained(path, max_shard_size="200KB")
    write_byte_tokenizer(path / "tokenizer.model")
    # The text model's logits (Llama4ForConditionalGeneration's own forward fails without images in transformers 5.24)
    text_model = model.language_model if conditional else model
    with torch.no_grad():
        return text_model(TOKENS, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def hf_causal(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama4")
    return path, _hf_folder(path, conditional=False)


def test_a_llama4_for_causal_lm_folder_gives_the_logits_of_transformers(hf_causal):
    path, expected = hf_causal
    assert len(list(path.glob("model-*.safetensors"))) > 1
    args = args_for(read_params(path))
    assert (args.nope_layer_interval, args.moe_args.interleave_moe_layer_step, args.attention_chunk_size) == (4, 2, 8)
    assert (args.expert_hidden_dim, args.ffn_hidden_dim) == (48, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to say
        got = logits(path, args)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_llama4_for_conditional_generation_folder_loads_its_text_model_and_vision_tower(tmp_path):
    # Its image prompts: tests/test_llama4_vision.py. A text-only build skips the tower with one line.
    expected = _hf_folder(tmp_path, conditional=True)
    args = args_for(read_params(tmp_path))
    assert args.vision_args.dim == 32 and args.vision_args.mlp_ratio == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to say
        model = build_transformer(tmp_path, args, CPU, torch.float32)
    assert hasattr(model, "vision_embeddings")
    torch.testing.assert_close(model(TOKENS, 0), expected, atol=ATOL, rtol=0)
    text_only = model_args(read_params(tmp_path), max_seq_len=24, max_batch_size=2, vision_args=None)
    with pytest.warns(UserWarning, match=r"text-only build: the vision tower's weights .* parameters") as record:
        got = logits(tmp_path, text_only)
    assert len(record) == 1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


BASE = dict(HF_TEXT, architectures=["Llama4ForCausalLM"], model_type="llama4_text")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"no_rope_layers": [1, 0, 0, 1]}, r"NoPE \(no_rope_layers 0\) at layers \[1, 2\] is not every n-th layer"),
        ({"moe_layers": [0, 3]}, r"moe_layers at layers \[0, 3\] is not every n-th layer"),
        ({"head_dim": 16}, "head_dim=16 is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "RoPE type 'yarn' is not supported"),
        ({"layer_types": ["full_attention"] * 4}, "layer_types .* disagree with no_rope_layers"),
        ({"num_local_experts": "4"}, "'num_local_experts' must be a positive integer"),
    ],
)
def test_llama4_configs_this_library_cannot_compute_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        config_params(BASE | change, "config.json")


def test_a_llama4_config_missing_a_size_names_it():
    config = {k: v for k, v in BASE.items() if k != "intermediate_size_mlp"}
    with pytest.raises(ValueError, match="config.json lacks intermediate_size_mlp"):
        config_params(config, "config.json")


def test_a_scout_config_maps_to_scouts_params_json():
    # The text_config of meta-llama/Llama-4-Scout-17B-16E's config.json, abridged, against Meta's params.json
    text = dict(
        model_type="llama4_text",
        hidden_size=5120,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=202048,
        num_local_experts=16,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        moe_layers=list(range(48)),
        no_rope_layers=[1, 1, 1, 0] * 12,
        attention_chunk_size=8192,
        use_qk_norm=True,
        attn_temperature_tuning=4,  # sic: read as true, as transformers reads it
        floor_scale=8192,
        attn_scale=0.1,
        rope_theta=500000.0,
        rope_scaling=dict(
            factor=16.0,
            high_freq_factor=1.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
    )
    config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}
    params = config_params(config, "config.json")
    expected = dict(n_layers=48, n_heads=40, n_kv_heads=8, nope_layer_interval=4, use_qk_norm=True)
    expected |= dict(
        attention_chunk_size=8192, use_scaled_rope=True, rope_scaling_factor=16.0, rope_high_freq_factor=1.0
    )
    assert {k: params[k] for k in expected} == expected
    assert params["moe_args"] == dict(num_experts=16, top_k=1, interleave_moe_layer_step=1)
    assert params["attn_temperature_tuning"] is True
    # The sizes config.json states are those Meta's sizing rules give for Scout's params.json
    args = ModelArgs(**params)
    scout = dict(dim=5120, n_heads=40, multiple_of=2048, ffn_dim_multiplier=1.2, ffn_exp=4.0)
    meta = ModelArgs(**scout, moe_args=dict(num_experts=16, capacity_factor=1.0, auto_scale_F=True))
    assert (args.expert_hidden_dim, args.ffn_hidden_dim) == (meta.expert_hidden_dim, meta.ffn_hidden_dim) == (8192, 16384)


# --- several processes ----------------------------------------------------------------------------------------

TORCHRUN_CASES = (1, 2, 4, "modules", "hf")


@pytest.fixture(scope="module")
def two_rank_logits(ckpt, hf_causal, tmp_path_factory):
    folders = [hf_causal[0] if case == "hf" else ckpt[2][case] for case in TORCHRUN_CASES]
    out = torchrun_logits_many(folders, TOKENS, 2, tmp_path_factory.mktemp("torchrun-llama4"))
    return dict(zip(TORCHRUN_CASES, out))


@pytest.mark.parametrize("source", TORCHRUN_CASES)
def test_two_ranks_under_torchrun_give_the_logits_of_one(two_rank_logits, reference, hf_causal, source):
    # The released layout as it is (2 shards on 2 ranks), split (1 shard) and merged (4 shards), the module
    # names, and a Hugging Face folder: each equals one process (transformers, for the Hugging Face folder).
    expected = hf_causal[1] if source == "hf" else reference
    torch.testing.assert_close(two_rank_logits[source], expected, atol=ATOL if source == "hf" else 1e-5, rtol=0)
