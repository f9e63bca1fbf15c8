"""The mistakes people make most often when loading, each ending in one error that names the real cause and the fix,
raised before the model is built: a model-parallel size the model cannot use (under torchrun, as a user runs it),
shards missing after an interrupted download, a tokenizer from another model, damaged bytes inside a shard, a file
given for the folder, a Hugging Face folder without its safetensors weights; and progress on stderr only for slow
loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizer_paths
import torch

from llama import checkpoint
from llama.args import ModelArgs, model_args
from llama.checkpoint import build_transformer, check_parallel_size, resolve
from llama.tiny import TINY_LLAMA4_PARAMS, TINY_PARAMS, random_state_dict, write_byte_tokenizer, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LLAMA4_PARAMS = dict(TINY_LLAMA4_PARAMS, vocab_size=512)
llama3_path = tokenizer_paths.llama3_path  # a fixture: Meta's Llama 3 tokenizer.model


def make_folder(path: Path, params: dict = TINY_PARAMS, n_shards: int = 1, released: bool = False) -> dict:
    args = args_for(params)
    state = random_state_dict(args, seed=0, dtype=torch.float32)
    write_checkpoint(path, params, state, n_shards, released=released)
    write_byte_tokenizer(path / "tokenizer.model")
    return state


def args_for(params: dict) -> ModelArgs:
    args = model_args(params, max_seq_len=32, max_batch_size=2)
    if args.vocab_size == -1:
        args.vocab_size = 512
    return args


def build(path: Path, params: dict = TINY_PARAMS, **kwargs):
    return build_transformer(path, args_for(params), CPU, torch.float32, **kwargs)


@pytest.fixture
def no_transformer(monkeypatch):
    """Building the model fails the test: the errors below must come before anything is allocated."""

    def refuse(args):
        raise AssertionError("Transformer(args) was built before the error")

    monkeypatch.setattr(checkpoint, "Transformer", refuse)


# --- 1. a model-parallel size the model cannot use ------------------------------------------------------------


def test_torchrun_with_three_processes_on_a_tiny_model_says_which_sizes_work(tmp_path):
    make_folder(tmp_path / "tiny-llama")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    cmd += [str(ROOT / "example_text_completion.py"), "--ckpt_dir", "tiny-llama"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "is not divisible by model_parallel_size=3" in output and "among 1, 2" in output, output[-3000:]
    # fairscale's own assertion ("512 is not divisible by 3") came from building the model: it is never reached.
    assert "AssertionError" not in output and "fairscale" not in output and "model.py" not in output, output[-3000:]
    assert len(output.splitlines()) < 163, output  # the count, from fairscale's assertion on every rank


def test_model_parallel_size_3_in_process_fails_before_the_model_is_built(tmp_path, no_transformer):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by model_parallel_size=3.*among 1, 2$"):
        build(tmp_path, rank=0, world=3)


def test_llama_build_with_model_parallel_size_3_names_the_sizes_not_torchrun(tmp_path, no_transformer):
    # Checked before the process group: "run with torchrun --nproc_per_node 3" would send the user to a size
    # that fails too.
    from llama import Llama

    make_folder(tmp_path)
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by model_parallel_size=3.*among 1, 2$"):
        Llama.build(tmp_path, None, 32, 1, model_parallel_size=3, device="cpu")


def test_a_two_shard_llama4_on_three_ranks_fails_before_the_model_is_built(tmp_path, no_transformer):
    make_folder(tmp_path, LLAMA4_PARAMS, n_shards=2, released=True)
    with pytest.raises(ValueError, match=r"2 shards, which cannot be split over 3 model-parallel ranks"):
        build(tmp_path, LLAMA4_PARAMS, rank=0, world=3)


LLAMA2_7B = dict(dim=4096, n_heads=32, vocab_size=32000, multiple_of=256)
LLAMA3_8B = dict(dim=4096, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3)
LLAMA3_70B = dict(dim=8192, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096, ffn_dim_multiplier=1.3)


@pytest.mark.parametrize(
    "sizes, n_shards, world, match",
    [
        (LLAMA2_7B, 1, 3, r"n_heads=32 is not divisible by model_parallel_size=3.*among 1, 2, 4, 8, 16, 32$"),
        (LLAMA3_8B, 1, 6, r"n_heads=32 is not divisible by model_parallel_size=6.*among 1, 2, 4, 8$"),
        (LLAMA3_70B, 8, 3, r"8 shards, which cannot be split over 3 .*runs on 1, 2, 4, 8\)$"),
        (LLAMA3_70B, 8, 6, r"8 shards, which cannot be split over 6 .*runs on 1, 2, 4, 8\)$"),
    ],
)
def test_real_model_sizes_on_three_or_six_ranks(sizes, n_shards, world, match):
    with pytest.raises(ValueError, match=match):
        check_parallel_size(ModelArgs(**sizes), n_shards, world, "model")


def test_a_llama2_vocabulary_alone_at_three_ranks_is_named():
    args = ModelArgs(dim=96, n_heads=3, vocab_size=32000, multiple_of=3)
    with pytest.raises(ValueError, match=r"vocab_size=32000 is not divisible by model_parallel_size=3.*among 1$"):
        check_parallel_size(args, 1, 3, "model")


# --- 2. missing shards, a tokenizer from another model --------------------------------------------------------


def test_a_missing_last_shard_is_named_not_blamed_on_params_json(tmp_path, no_transformer):
    make_folder(tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.01.pth is missing from .*re-run download.sh") as e:
        build(tmp_path)
    assert "params.json implies" not in str(e.value)


def test_two_missing_shards_of_four_are_named(tmp_path, no_transformer):
    make_folder(tmp_path, n_shards=4)
    for i in (2, 3):
        (tmp_path / f"consolidated.0{i}.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.02.pth, consolidated.03.pth are missing"):
        build(tmp_path)


def test_a_missing_llama4_shard_is_named(tmp_path, no_transformer):
    make_folder(tmp_path, LLAMA4_PARAMS, n_shards=2, released=True)
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.01.pth is missing.*re-run download.sh"):
        build(tmp_path, LLAMA4_PARAMS)


def test_a_shard_listed_in_download_sh_checklist_but_absent_is_named_from_the_file_set(tmp_path):
    make_folder(tmp_path, n_shards=2)
    names = ["params.json", "consolidated.00.pth", "consolidated.01.pth"]
    (tmp_path / "checklist.chk").write_text("".join(f"{'0' * 32}  {name}\n" for name in names))
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.01.pth is missing.*re-run download.sh"):
        resolve(tmp_path)  # from the folder's files alone, before a weight is opened


def test_a_gap_in_the_shard_numbers_is_named(tmp_path):
    make_folder(tmp_path, n_shards=3)
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.01.pth is missing"):
        resolve(tmp_path)


def test_params_json_of_another_model_is_still_blamed_on_params_json(tmp_path):
    make_folder(tmp_path, n_shards=2)
    params = dict(TINY_PARAMS, dim=128)
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json implies"):
        build(tmp_path, params)


def test_a_llama2_params_json_with_a_llama3_tokenizer_names_the_tokenizer(tmp_path, llama3_path):
    from llama import Llama

    llama2 = {k: v for k, v in TINY_PARAMS.items() if k not in ("rope_theta", "use_scaled_rope", "n_kv_heads")}
    make_folder(tmp_path, dict(llama2, vocab_size=-1))
    with pytest.raises(ValueError, match=r"tokenizer \(128256 tokens.*512 rows.*tokenizer shipped with these weights"):
        Llama.build(str(tmp_path), str(llama3_path), 32, 2, device="cpu", dtype="float32")


# --- 4. damaged bytes inside a shard --------------------------------------------------------------------------


def corrupt(shard: Path, tensor: torch.Tensor, index: int, value: float) -> None:
    """Overwrite element `index` of `tensor`'s bytes where they lie inside the saved shard (stored uncompressed)."""
    data, raw = bytearray(shard.read_bytes()), tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not in the file exactly once"
    size = tensor.element_size()
    data[at + index * size : at + (index + 1) * size] = (
        torch.tensor([value], dtype=tensor.dtype).view(torch.uint8).numpy().tobytes()
    )
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_damaged_on_disk_is_named_with_its_file(tmp_path, value):
    state = make_folder(tmp_path, n_shards=2)
    key = "layers.1.feed_forward.w2.weight"  # split along dim 1: shard 1 holds the second half of each row
    piece = state[key].chunk(2, dim=1)[1]
    corrupt(tmp_path / "consolidated.01.pth", piece, 37, value)
    shard = torch.load(tmp_path / "consolidated.01.pth", mmap=True, weights_only=True)
    assert not torch.isfinite(shard[key]).all()  # the bytes landed in the weight, and the file still loads
    with pytest.raises(ValueError, match=rf"consolidated.01.pth: '{key}' holds 1 NaN or infinite.*download it again"):
        build(tmp_path)


def test_a_damaged_bfloat16_weight_kept_mapped_is_caught(tmp_path):
    args = args_for(TINY_PARAMS)
    state = random_state_dict(args, seed=0, dtype=torch.bfloat16)
    write_checkpoint(tmp_path, TINY_PARAMS, state)
    corrupt(tmp_path / "consolidated.00.pth", state["norm.weight"], 5, float("nan"))
    with pytest.raises(ValueError, match=r"consolidated.00.pth: 'norm.weight' holds 1 NaN"):
        build_transformer(tmp_path, args, CPU, torch.bfloat16)


def test_a_weight_too_large_for_float16_is_told_apart_from_damage(tmp_path):
    args = args_for(TINY_PARAMS)
    state = random_state_dict(args, seed=0, dtype=torch.float32)
    state["norm.weight"][3] = 1e6
    write_checkpoint(tmp_path, TINY_PARAMS, state)
    with pytest.raises(ValueError, match=r"'norm.weight' in .*consolidated.00.pth holds values too large for "):
        build_transformer(tmp_path, args, CPU, torch.float16)


# --- 7. progress ------------------------------------------------------------------------------------------------


def test_a_fast_load_prints_nothing(tmp_path, capfd):
    make_folder(tmp_path)
    build(tmp_path)
    assert capfd.readouterr() == ("", "")


def test_a_slow_load_shows_progress_on_stderr(tmp_path, capfd, monkeypatch):
    make_folder(tmp_path, n_shards=2)
    monkeypatch.setattr(checkpoint, "PROGRESS_AFTER_S", 0.0)  # as if every weight took longer than that
    build(tmp_path)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[-1].startswith(f"loaded {tmp_path}: 0.0 GB in "), err
    assert any("layer 2/2" in line for line in lines[:-1]) and all(line.startswith("loading ") for line in lines[:-1])


# --- 9. a file for the folder, a Hugging Face folder without its weights ----------------------------------------


@pytest.mark.parametrize("name", ["params.json", "consolidated.00.pth"])
def test_a_file_given_as_ckpt_dir_names_its_folder(tmp_path, name):
    make_folder(tmp_path / "tiny")
    with pytest.raises(
        ValueError, match=rf"{name} is a file.*pass the folder that holds params.json: {tmp_path}/tiny$"
    ):
        resolve(tmp_path / "tiny" / name)


HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 224,
    "vocab_size": 512,
}


def test_a_hugging_face_folder_with_bin_weights_says_safetensors_are_expected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin is not read here.*safetensors"
    ):
        resolve(tmp_path)


def test_a_hugging_face_folder_without_the_safetensors_package_says_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # what `import safetensors` sees when it is not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install safetensors"):
        resolve(tmp_path)
