"""Llama.build on Meta-format folders: what loads, and the clear error for each way a folder can be wrong."""

import json
import warnings

import pytest
import torch

from llama import Llama
from llama.args import model_args
from llama.checkpoint import build_transformer, load_state_dict
from llama.tiny import TINY_PARAMS, random_state_dict, write_byte_tokenizer, write_checkpoint


def make_folder(path, params=TINY_PARAMS, n_shards=1, state=None, tokenizer=True):
    args = model_args(params, max_seq_len=32, max_batch_size=2)
    if args.vocab_size == -1:
        args.vocab_size = 512
    state = random_state_dict(args, seed=0) if state is None else state
    write_checkpoint(path, params, state, n_shards)
    if tokenizer:
        write_byte_tokenizer(path / "tokenizer.model")  # 256 bytes + 256 special tokens = 512
    return state


def build(path, **kwargs):
    return Llama.build(str(path), None, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32", **kwargs)


def test_a_llama2_params_json_loads_with_vocab_from_the_tokenizer_and_rope_freqs_dropped(tmp_path):
    llama2 = {k: v for k, v in TINY_PARAMS.items() if k not in ("rope_theta", "use_scaled_rope", "n_kv_heads")}
    llama2["vocab_size"] = -1
    state = make_folder(tmp_path, llama2, state=None)
    state["rope.freqs"] = torch.zeros(8)  # Llama 2 checkpoints carry their RoPE table
    torch.save(state, tmp_path / "consolidated.00.pth")
    llama = build(tmp_path)
    assert llama.model.params.vocab_size == 512 and llama.model.params.rope_theta == 10000.0
    assert torch.equal(llama.model.layers[1].feed_forward.w2.weight, state["layers.1.feed_forward.w2.weight"].float())


def test_weights_are_mapped_from_disk_not_copied_when_the_dtype_matches(tmp_path):
    make_folder(tmp_path)
    # The checkpoint layer itself: Llama.build may then swap linear layers for a faster CPU layout.
    args = model_args(TINY_PARAMS, max_seq_len=32, max_batch_size=2)
    model = build_transformer(tmp_path, args, torch.device("cpu"), torch.bfloat16)
    shard = torch.load(tmp_path / "consolidated.00.pth", mmap=True, weights_only=True)
    w = model.layers[0].attention.wq.weight
    assert torch.equal(w, shard["layers.0.attention.wq.weight"])
    # Built on the meta device and given the mapped tensors: the parameter's storage is the file's.
    assert w.untyped_storage().nbytes() == shard["layers.0.attention.wq.weight"].untyped_storage().nbytes()


def test_unknown_params_keys_are_ignored_with_a_warning(tmp_path):
    make_folder(tmp_path, dict(TINY_PARAMS, some_new_setting=3))
    with pytest.warns(UserWarning, match="some_new_setting"):
        build(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        build(tmp_path / "nope")


def test_folder_without_shards(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated"):
        build(tmp_path)


def test_gap_in_shard_numbers(tmp_path):
    make_folder(tmp_path, n_shards=2)
    (tmp_path / "consolidated.00.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth"):
        build(tmp_path)


def test_missing_tokenizer(tmp_path):
    make_folder(tmp_path, tokenizer=False)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps(dict(TINY_PARAMS, dim="64")), "'dim'"),
        (json.dumps(dict(TINY_PARAMS, use_scaled_rope="yes")), "'use_scaled_rope'"),
        (json.dumps(dict(TINY_PARAMS, n_heads=5)), "heads"),
        (json.dumps(dict(TINY_PARAMS, n_kv_heads=3)), "n_kv_heads"),
        (json.dumps(dict(TINY_PARAMS, n_layers=0)), "n_layers"),
    ],
)
def test_broken_params_json(tmp_path, text, match):
    make_folder(tmp_path)
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        build(tmp_path)
    assert "params.json" in str(e.value)


def test_params_json_of_another_model_than_the_shards(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(dict(TINY_PARAMS, dim=128)))
    with pytest.raises(
        ValueError,
        match=r"consolidated.00.pth: 'tok_embeddings.weight' has shape \(512, 64\) but params.json implies \(512, 128\)",
    ):
        build(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = make_folder(tmp_path)
    del state["layers.1.ffn_norm.weight"]
    state["layers.1.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers.1.ffn_norm.weight.*layers.1.extra.weight"):
        build(tmp_path)


def test_tokenizer_vocabulary_against_params(tmp_path):
    make_folder(tmp_path, dict(TINY_PARAMS, vocab_size=640))
    with pytest.raises(ValueError, match="vocab_size 640.*512 tokens"):
        build(tmp_path)


def test_model_parallel_size_needs_as_many_processes(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        build(tmp_path, model_parallel_size=2)


def test_shard_count_that_cannot_be_split_over_the_ranks(tmp_path):
    make_folder(tmp_path, n_shards=2)
    args = model_args(TINY_PARAMS, max_seq_len=32, max_batch_size=2)
    with pytest.raises(ValueError, match="2 shards.*3 model-parallel ranks"):
        load_state_dict(tmp_path, args, rank=0, world=3)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    state = make_folder(tmp_path)
    marker = tmp_path / "pwned"
    state["norm.weight"] = _RunsCode(marker)
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="consolidated.00.pth.*could run code"):
        build(tmp_path)
    assert not marker.exists()


def test_a_truncated_shard_names_the_file(tmp_path):
    make_folder(tmp_path)
    shard = tmp_path / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="consolidated.00.pth.*download it again"):
        build(tmp_path)


def test_a_failed_build_leaves_nothing_that_breaks_the_next(tmp_path):
    make_folder(tmp_path / "bad", dict(TINY_PARAMS, vocab_size=640))
    make_folder(tmp_path / "good")
    with pytest.raises(ValueError):
        build(tmp_path / "bad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama = build(tmp_path / "good")
    assert llama.model(torch.tensor([[1, 2, 3]]), 0).shape == (1, 3, 512)


def test_build_with_int8_quantization_swaps_the_linear_layers_and_stays_close(tmp_path):
    from llama.quantize import Int8Linear

    make_folder(tmp_path)
    plain = Llama.build(str(tmp_path), None, 32, 2, device="cpu", dtype="bfloat16")
    int8 = Llama.build(str(tmp_path), None, 32, 2, device="cpu", dtype="bfloat16", quantize="int8")
    assert isinstance(int8.model.layers[0].attention.wq, Int8Linear) and isinstance(int8.model.output, Int8Linear)
    tokens = torch.tensor([[5, 6, 7, 8]])
    a, b = plain.model(tokens, 0), int8.model(tokens, 0)
    assert (a - b).abs().max() <= 0.1 * a.std()  # the bound tests/test_quantize.py states for the model
    assert int8.text_completion(["hi"], max_gen_len=4, temperature=0)[0]["generation"] is not None


def test_unknown_quantization_is_refused(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match="quantize=.int3."):
        build(tmp_path, quantize="int3")
