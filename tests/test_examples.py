"""The two example scripts run end to end on a tiny random checkpoint, with plain python and with torchrun."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_PROMPTS = ["The most useful thing I learned", "English to Spanish:", "A note to the volunteers"]
CHAT_TURNS = ["User: What is a good recipe", "System: Answer in exactly one sentence.", "Assistant: Lovely!"]


def run(args: list[str], torchrun_nproc: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", LLAMA_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    launcher = [sys.executable]
    if torchrun_nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}"]
    result = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "tiny-llama"
    run(["-m", "llama.tiny", "--out_dir", str(out)])  # as the README and install.sh make it
    return out


def test_chat_example_as_install_sh_runs_it(tiny):
    out = run(
        [
            "example_chat_completion.py",
            "--ckpt_dir",
            str(tiny),
            "--tokenizer_path",
            str(tiny / "tokenizer.model"),
            "--max_gen_len",
            "16",
        ]
    )
    assert out.count("> Assistant: ") == 4
    assert all(turn in out for turn in CHAT_TURNS)


def test_text_example_with_plain_python_and_no_tokenizer_path(tiny):
    out = run(["example_text_completion.py", "--ckpt_dir", str(tiny), "--max_gen_len", "8", "--temperature", "0"])
    assert all(prompt in out for prompt in TEXT_PROMPTS)
    assert out.count("==================================") == 4


def test_text_example_with_compile_prints_the_plain_greedy_text(tiny, monkeypatch):
    monkeypatch.setenv("LLAMA_DTYPE", "float32")  # bfloat16 rounds differently once inductor fuses the ops
    args = ["example_text_completion.py", "--ckpt_dir", str(tiny), "--max_gen_len", "8", "--temperature", "0"]
    assert run(args + ["--compile"]) == run(args)  # torch.compile of the decode step, on the CPU here


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_under_torchrun(tiny, script):
    out = run(
        [script, "--ckpt_dir", str(tiny), "--tokenizer_path", str(tiny / "tokenizer.model"), "--max_gen_len", "12"], 1
    )
    assert out.count("==================================") == 4


def test_chat_example_on_two_model_parallel_ranks_prints_once(tmp_path):
    out = tmp_path / "tiny-2"
    run(["-m", "llama.tiny", "--out_dir", str(out), "--n_shards", "2"])
    printed = run(["example_chat_completion.py", "--ckpt_dir", str(out), "--max_gen_len", "8"], 2)
    assert printed.count("> Assistant: ") == 4


RANK_WORKER = """
import json, sys
import torch.distributed as dist
from llama import Llama

llama = Llama.build(sys.argv[1], None, 64, 2, device="cpu", dtype="float32")
prompts = ["Once upon a time", "The llama"]
sampled = llama.text_completion(prompts, max_gen_len=24, temperature=1.0, top_p=0.95)
greedy = llama.text_completion(prompts, max_gen_len=24, temperature=0)
with open(f"{sys.argv[2]}.{dist.get_rank()}", "w") as f:
    json.dump([r["generation"] for r in sampled + greedy], f)
"""


def test_model_parallel_ranks_draw_the_same_tokens(tmp_path):
    # Each rank samples on its own from the gathered logits: they stay in step only if their draws agree.
    ckpt = tmp_path / "tiny-2"
    run(["-m", "llama.tiny", "--out_dir", str(ckpt), "--n_shards", "2"])
    worker = tmp_path / "worker.py"
    worker.write_text(RANK_WORKER)
    run([str(worker), str(ckpt), str(tmp_path / "out")], 2)
    rank0, rank1 = ((tmp_path / f"out.{r}").read_text() for r in (0, 1))
    assert rank0 == rank1
    run([str(worker), str(ckpt), str(tmp_path / "single")])  # one process, the same seed
    assert json.loads((tmp_path / "single.0").read_text())[2:] == json.loads(rank0)[2:]  # greedy: the same text


def test_chat_example_with_tools_runs_one_tool_dialog(tiny):
    # A random-weight model calls no tool: the script prints its one reply and why it stopped.
    out = run(["example_chat_completion.py", "--ckpt_dir", str(tiny), "--max_gen_len", "8", "--tools"])
    assert len(re.findall(r"> Assistant \((end_of_turn|end_of_message|out_of_tokens)\): ", out)) == 1
    assert "What is a good recipe" not in out  # the default dialogs are not run


@pytest.fixture(scope="module")
def tiny_llama4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "tiny-llama4"
    run(["-m", "llama.tiny", "--llama4", "--out_dir", str(out), "--n_shards", "2"])
    return out


def test_tiny_llama4_is_in_metas_released_layout_with_the_llama4_tokenizer(tiny_llama4):
    import torch

    from llama.tiny import llama4_tokenizer

    params = json.loads((tiny_llama4 / "params.json").read_text())
    assert params["moe_args"]["num_experts"] > 1 and params["nope_layer_interval"] and params["attention_chunk_size"]
    keys = torch.load(tiny_llama4 / "consolidated.01.pth", weights_only=True, mmap=True).keys()
    assert {"layers.0.attention.wqkv.weight", "layers.1.feed_forward.experts.moe_w_in_eD_F"} <= set(keys)
    assert params["vision_args"] and {"vision_embeddings.vision_encoder.conv1._linear.weight"} <= set(keys)
    if llama4_tokenizer() is not None:  # Meta's reference installed: its Llama 4 tokenizer is the one copied
        assert (tiny_llama4 / "tokenizer.model").read_bytes() == llama4_tokenizer().read_bytes()


@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun-2"])
@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_on_a_tiny_llama4(tiny_llama4, script, nproc):
    # Two shards: merged onto one process with plain python, one each under torchrun --nproc_per_node 2.
    out = run([script, "--ckpt_dir", str(tiny_llama4), "--max_gen_len", "12"], nproc)
    assert out.count("==================================") == 4
    if script == "example_chat_completion.py":
        assert out.count("> Assistant: ") == 4
