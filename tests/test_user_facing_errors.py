"""What a user sees, run as a user runs it (subprocesses with python and torchrun, outside the repository): a quiet
stdout, errors without "[rank0]: " prefixes, one message per mistake under torchrun, a device that is not there
refused up front, a light `import llama`, the examples' flags; and generate's max_gen_len=None."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_helpers import build, plain_greedy, write_tiny

from llama import Llama

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, torchrun_nproc: int = 0, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "LLAMA_DEVICE": "cpu", **env_vars}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    launcher = [sys.executable]
    if torchrun_nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}"]
    return subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny", dim=32, n_heads=2, n_kv_heads=1, n_layers=1)


COMPLETE = """
import json, sys
from llama import Llama
llama = Llama.build(sys.argv[1], None, 32, 1, dtype="float32")
generation = llama.text_completion(["abc"], max_gen_len=6, temperature=0)[0]["generation"]
print(json.dumps(generation))
"""


def test_a_build_and_completion_print_nothing_but_the_completion(tiny, tmp_path):
    out = run(["-c", COMPLETE, str(tiny)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    expected = build(tiny, max_seq_len=32, max_batch_size=1).text_completion(["abc"], max_gen_len=6, temperature=0)
    assert out.stdout == json.dumps(expected[0]["generation"]) + "\n"  # no "> initializing model parallel ..."


USER_BUG = """
import sys
from llama import Llama
Llama.build(sys.argv[1], None, 32, 1)
{}["x"]
"""


def test_an_error_after_build_is_printed_as_python_prints_it(tiny, tmp_path):
    out = run(["-c", USER_BUG, str(tiny)], cwd=tmp_path)
    plain = run(["-c", '{}["x"]'], cwd=tmp_path)  # the same error without the library
    assert out.returncode == plain.returncode == 1
    assert "[rank0]" not in out.stderr
    assert out.stderr.splitlines()[0] == plain.stderr.splitlines()[0] == "Traceback (most recent call last):"
    assert out.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1] == "KeyError: 'x'"


def test_import_llama_does_not_import_the_compiler(tmp_path):
    code = "import sys; from llama import Llama; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    out = run(["-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda_is_a_value_error_before_the_checkpoint_is_read(device, tmp_path):
    # The folder does not exist: the device is refused first, whatever else is wrong.
    with pytest.raises(ValueError, match=r"device='cuda.*(no CUDA|no CUDA device is visible).*device='cpu'"):
        Llama.build(tmp_path / "missing", None, 32, 1, device=device)


def test_other_devices_are_value_errors(tiny):
    with pytest.raises(ValueError, match=r"device='mps': mps devices are not supported.*device='cpu'"):
        Llama.build(tiny, None, 32, 1, device="mps")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device"):
        Llama.build(tiny, None, 32, 1, device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_llama_device_cuda_without_cuda_is_one_line_from_the_example(tiny, tmp_path):
    script = str(ROOT / "example_text_completion.py")
    out = run([script, "--ckpt_dir", str(tiny)], cwd=tmp_path, LLAMA_DEVICE="cuda")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("ValueError: LLAMA_DEVICE='cuda', but ")
    assert "unset LLAMA_DEVICE" in out.stderr and len(out.stderr.splitlines()) == 1  # no traceback


@pytest.mark.parametrize("when", ["a wrong folder", "a model-parallel size the model cannot take"])
def test_a_mistake_every_rank_makes_under_torchrun_is_printed_once(when, tiny, tmp_path):
    script = str(ROOT / "example_text_completion.py")
    if when == "a wrong folder":  # found before the process group is set up
        args, error = ["--ckpt_dir", str(tmp_path / "missing")], "FileNotFoundError: "
    else:  # found after: the tiny model's one key-value head cannot be split over 2 ranks
        args, error = ["--ckpt_dir", str(tiny)], "ValueError: "
    out = run([script, *args], cwd=tmp_path, torchrun_nproc=2)
    assert out.returncode != 0 and out.stdout == ""
    assert len([line for line in out.stderr.splitlines() if line.startswith(error)]) == 1
    assert 'example_text_completion.py", line' not in out.stderr  # no traceback from the ranks
    # torchrun's own summary names the error instead of a link to its documentation.
    assert f"traceback : {error}" in out.stderr and "To enable traceback" not in out.stderr


RANK_ONE_FAILS = """
import os
from llama.distributed import exit_on_user_error
with exit_on_user_error():
    if os.environ["RANK"] == "1":
        raise ValueError("a mistake of rank 1's own")
"""


def test_an_error_of_one_rank_other_than_0_is_printed_by_that_rank(tmp_path):
    (tmp_path / "worker.py").write_text(RANK_ONE_FAILS)
    out = run(["worker.py"], cwd=tmp_path, torchrun_nproc=2)
    assert out.returncode != 0
    assert out.stderr.splitlines()[0] == "ValueError: a mistake of rank 1's own (rank 1)"


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_help_describes_every_flag(script, tmp_path):
    out = run([str(ROOT / script), "--help"], cwd=tmp_path, PAGER="cat")
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()  # fire writes help to stderr when it is not a terminal
    assert not any("Optional[Optional]" in line for line in lines)
    flags = [line.strip() for line in lines if line.strip().startswith(("--", "-c, --", "-q, --"))]
    assert any("--quantize" in f for f in flags) and len(flags) >= 8
    for flag in flags:  # under each flag: its type, its default, then a line of description
        i = lines.index(next(line for line in lines if line.strip() == flag))
        assert lines[i + 1].strip().startswith("Type: ") and lines[i + 2].strip().startswith("Default: ")
        assert lines[i + 3].strip() and not lines[i + 3].strip().startswith("--")


def test_example_quantize_flag_reaches_build(tiny, tmp_path):
    script = str(ROOT / "example_text_completion.py")
    out = run([script, "--ckpt_dir", str(tiny), "--max_gen_len", "4", "--quantize", "int8"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("==================================") == 4
    bad = run([script, "--ckpt_dir", str(tiny), "--quantize", "int3"], cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("ValueError: quantize='int3' is not supported")


def test_compile_says_it_is_compiling_once_and_does_not_warn(tiny, tmp_path):
    code = COMPLETE.replace('dtype="float32"', 'dtype="float32", compile=True')
    out = run(["-c", code, str(tiny)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plain = build(tiny, max_seq_len=32, max_batch_size=1).text_completion(["abc"], max_gen_len=6, temperature=0)
    assert out.stdout == json.dumps(plain[0]["generation"]) + "\n"
    assert out.stderr.count("compiling the decode step") == 1
    assert "complex operators" not in out.stderr and "Warning" not in out.stderr


# -- generate's max_gen_len=None --------------------------------------------------------------------------------


def test_generate_with_max_gen_len_none_runs_to_the_end_of_the_context(tiny, monkeypatch):
    llama = build(tiny, max_seq_len=24, max_batch_size=2)
    monkeypatch.setattr(llama, "stop_tokens", [])
    prompts = [[300, 65, 66], [300] + [70] * 9]
    tokens, _ = llama.generate(prompts, None, temperature=0)
    for prompt, out in zip(prompts, tokens):
        assert len(prompt) + len(out) == 24
        assert out == plain_greedy(llama.model, prompt, 10**6, [])
