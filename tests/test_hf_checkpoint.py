"""Hugging Face model folders (config.json + safetensors) load through Llama.build and compute what
transformers' LlamaForCausalLM computes; Meta's files under original/ win; each bad folder gets a clear error."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama import Llama
from llama.args import ModelArgs, config_params, model_args
from llama.checkpoint import read_params
from llama.tiny import TINY_PARAMS, random_state_dict, write_byte_tokenizer, write_checkpoint

ATOL = 1e-4
TOKENS = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(0))


def hf_config(**overrides) -> LlamaConfig:
    # head_dim 32 and 300 positions, so that the llama3 RoPE scaling factor shows in the logits;
    # intermediate_size 200 is no size Meta's rule gives for multiple_of 32: the model takes it as stated.
    config = dict(
        vocab_size=512,  # the byte tokenizer's 256 bytes + 256 special tokens
        hidden_size=128,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attn_implementation="eager",
    )
    return LlamaConfig(**{**config, **overrides})


def save_hf_model(path, config: LlamaConfig, max_shard_size="100KB", seed: int = 0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM saved with save_pretrained (sharded into several files), with the byte tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights large enough that attention, and so RoPE, matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.15)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    write_byte_tokenizer(path / "tokenizer.model")
    return model


def build(path):
    return Llama.build(str(path), None, max_seq_len=TOKENS.shape[1], max_batch_size=2, device="cpu", dtype="float32")


def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-sharded")
    return path, save_hf_model(path, hf_config())


def test_a_sharded_safetensors_folder_gives_the_logits_of_transformers(sharded):
    path, hf = sharded
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3 and (path / "model.safetensors.index.json").is_file()
    llama = build(path)
    args = llama.model.params
    assert (args.dim, args.n_heads, args.n_kv_heads, args.rope_theta) == (128, 4, 2, 500000.0)
    assert args.use_scaled_rope and args.rope_scaling_factor == 32.0
    torch.testing.assert_close(llama.model(TOKENS, 0), hf_logits(hf), atol=ATOL, rtol=0)


def test_a_build_resolves_the_folder_once_reads_each_settings_file_once_and_makes_one_model_args(
    sharded, monkeypatch
):
    import llama.checkpoint

    located, read, made = [], [], []
    locate, read_json, post_init = llama.checkpoint._locate, llama.checkpoint._read_json, ModelArgs.__post_init__
    monkeypatch.setattr(llama.checkpoint, "_locate", lambda path: located.append(path) or locate(path))
    monkeypatch.setattr(llama.checkpoint, "_read_json", lambda path: read.append(path.name) or read_json(path))
    monkeypatch.setattr(ModelArgs, "__post_init__", lambda self: made.append(self) or post_init(self))
    path, hf = sharded
    llama = build(path)
    assert (len(located), sorted(read), len(made)) == (1, ["config.json", "model.safetensors.index.json"], 1)
    assert llama.model.params is made[0]
    torch.testing.assert_close(llama.model(TOKENS[:, :8], 0), hf_logits(hf, TOKENS[:, :8]), atol=ATOL, rtol=0)


def test_the_logits_check_can_tell_a_wrong_rope_factor(sharded, tmp_path):
    path, hf = sharded
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"]["factor"] = 8.0
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert (build(tmp_path).model(TOKENS, 0) - hf_logits(hf)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("layout", ["shards-without-index", "single-file"])
def test_safetensors_without_an_index_file(tmp_path, layout):
    if layout == "single-file":
        hf = save_hf_model(tmp_path, hf_config(), max_shard_size="50MB")
        assert [f.name for f in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    else:
        hf = save_hf_model(tmp_path, hf_config())
        (tmp_path / "model.safetensors.index.json").unlink()
    tokens = TOKENS[:, :40]
    torch.testing.assert_close(build(tmp_path).model(tokens, 0), hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_tied_embeddings_share_the_embedding_and_match_transformers(tmp_path):
    # Llama 3.2 1B/3B style; a Llama 2 style config on the way: rope_theta 10000, multi-head attention.
    config = hf_config(tie_word_embeddings=True, num_key_value_heads=4, rope_parameters=None, rope_theta=10000.0)
    hf = save_hf_model(tmp_path, config)
    assert not any(
        "lm_head" in name for name in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    )
    llama = build(tmp_path)
    assert llama.model.output.weight is llama.model.tok_embeddings.weight
    assert not llama.model.params.use_scaled_rope and llama.model.params.rope_theta == 10000.0
    torch.testing.assert_close(llama.model(TOKENS, 0), hf_logits(hf), atol=ATOL, rtol=0)


def test_meta_files_under_original_are_used_and_named(tmp_path):
    save_hf_model(tmp_path, hf_config())
    (tmp_path / "tokenizer.model").unlink()  # as in HF's Llama 3 repositories: the tokenizer is under original/
    (tmp_path / "tokenizer.json").write_text("{}")
    params = dict(TINY_PARAMS, use_scaled_rope=False)  # another shape than config.json's: it tells which is read
    state = random_state_dict(ModelArgs(**params), seed=3, dtype=torch.float32)
    write_checkpoint(tmp_path / "original", params, state, n_shards=2)
    write_byte_tokenizer(tmp_path / "original" / "tokenizer.model")
    with pytest.warns(UserWarning, match=r"original/: loading .*original/params.json and consolidated"):
        llama = build(tmp_path)
    assert llama.model.params.dim == TINY_PARAMS["dim"]
    assert torch.equal(llama.model.layers[1].attention.wq.weight, state["layers.1.attention.wq.weight"])


def test_a_folder_with_only_tokenizer_json_asks_for_metas_tokenizer_model(tmp_path):
    save_hf_model(tmp_path, hf_config(), max_shard_size="50MB")
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json but no tokenizer.model.*original/tokenizer.model"):
        build(tmp_path)


# --- bad folders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [True, False], ids=["with-index", "without-index"])
def test_a_missing_safetensors_shard_is_named(sharded, tmp_path, index):
    path, _ = sharded
    files = sorted(path.glob("model-*.safetensors"))
    for f in path.iterdir():
        if f != files[1] and (index or f.name != "model.safetensors.index.json"):
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match=f"lacks {files[1].name}.*download it again"):
        build(tmp_path)


def test_a_truncated_safetensors_file_is_named(sharded, tmp_path):
    path, _ = sharded
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    damaged = sorted(path.glob("model-*.safetensors"))[0].name
    (tmp_path / damaged).unlink()
    (tmp_path / damaged).write_bytes((path / damaged).read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{damaged} cannot be read as safetensors.*download it again"):
        build(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
        {"architectures": None, "model_type": "gpt2"},
        {"architectures": ["LlamaForSequenceClassification"]},
    ],
)
def test_a_config_of_another_architecture_is_refused(sharded, tmp_path, change):
    config = json.loads((sharded[0] / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture"):
        read_params(tmp_path)


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"])
def test_a_config_missing_a_key_names_it(sharded, tmp_path, key):
    config = json.loads((sharded[0] / "config.json").read_text())
    del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json lacks {key}"):
        read_params(tmp_path)


BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336}
BASE |= {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"head_dim": 64}, "head_dim=64 is not supported"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE type 'linear' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}}, "high_freq_factor=2.0"),
        ({"num_hidden_layers": "32"}, "'num_hidden_layers' must be a positive integer"),
        ({"num_attention_heads": 5}, "heads"),
    ],
)
def test_llama_configs_this_architecture_cannot_compute_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        model_args(config_params(BASE | change), "config.json")


def test_tensors_that_are_not_llama_weights_are_refused(tmp_path):
    save_hf_model(tmp_path, hf_config(), max_shard_size="50MB")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(2, dtype=torch.int32)  # e.g. GPTQ
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"not LlamaForCausalLM weights \(model.layers.0.self_attn.q_proj.qweight\)"):
        build(tmp_path)


# --- config.json to params.json -------------------------------------------------------------------------------


def test_configs_of_older_transformers_with_rope_theta_and_rope_scaling():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key in ("rope_type", "type"):  # transformers 4.43+ and the spelling before it
        params = config_params(BASE | {"rope_theta": 500000.0, "rope_scaling": {**scaling, key: "llama3"}})
        assert params["rope_theta"] == 500000.0 and params["use_scaled_rope"] and params["rope_scaling_factor"] == 8.0
    params = config_params(BASE | {"rope_theta": 10000.0, "rope_scaling": None, "num_key_value_heads": None})
    assert params["rope_theta"] == 10000.0 and "use_scaled_rope" not in params and params["n_kv_heads"] == 32


# Meta's params.json for each model (dim, multiple_of, ffn_dim_multiplier) and the intermediate_size of the
# config.json Meta published beside it: the model built from either has the same feed-forward size.
PUBLISHED = {
    "llama2-7b": ((4096, 256, None), 11008),
    "llama2-13b": ((5120, 256, None), 13824),
    "llama3-8b": ((4096, 1024, 1.3), 14336),
    "llama3-70b": ((8192, 4096, 1.3), 28672),
    "llama3.1-405b": ((16384, 4096, 1.2), 53248),
    "llama3.2-1b": ((2048, 256, 1.5), 8192),
    "llama3.2-3b": ((3072, 256, 1.0), 8192),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_a_configs_intermediate_size_is_the_feed_forward_size_metas_params_give(name):
    (dim, multiple_of, multiplier), intermediate_size = PUBLISHED[name]
    meta = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    hf = model_args(config_params(BASE | {"hidden_size": dim, "intermediate_size": intermediate_size}))
    assert hf.ffn_hidden_dim == meta.ffn_hidden_dim == intermediate_size


def test_no_warning_for_the_many_config_keys_the_model_does_not_need(sharded):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(sharded[0])
