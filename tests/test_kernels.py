"""Runs tests/kernels (the Triton kernels against their PyTorch fallbacks) in a pytest process of its own:
in Triton's interpreter on CPU tensors, where TRITON_INTERPRET=1 is set before anything imports the
kernels, and, where there is a GPU, a second time with the kernels compiled for it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).parent / "kernels"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_kernel_tests(**env_changes: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_KERNELS", "TRITON_INTERPRET")}
    env.update(env_changes)
    command = [sys.executable, "-m", "pytest", str(KERNEL_TESTS), "-q", "-rfE", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command, cwd=KERNEL_TESTS.parent.parent, env=env, capture_output=True, text=True, timeout=1200
    )
    # The subprocess's own report, failures and all, is the message when it fails.
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-30000:]}\n{result.stderr[-5000:]}"
    )


@needs_triton
def test_triton_kernels_match_fallbacks_in_the_interpreter():
    run_kernel_tests(TRITON_INTERPRET="1")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_match_fallbacks_compiled_on_the_gpu():
    run_kernel_tests()


def test_forcing_triton_on_a_cpu_tensor_outside_the_interpreter_says_how_to_fix_it():
    code = (
        "import os, torch, llama_kernels\n"
        "x = torch.ones(2, 8)\n"
        "try:\n"
        "    llama_kernels.rms_norm(x, torch.ones(8), 1e-5)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LLAMA_KERNELS"] = "triton"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    if importlib.util.find_spec("triton") is None:
        assert "pip install triton" in result.stdout
    else:
        assert "TRITON_INTERPRET=1" in result.stdout and "unset LLAMA_KERNELS" in result.stdout
