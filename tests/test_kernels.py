"""Runs tests/kernels (the Triton kernels against their PyTorch fallbacks, in Triton's interpreter) in a
pytest process of its own, where TRITON_INTERPRET=1 is set before anything imports the kernels."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent / "kernels"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_fallbacks_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("LLAMA_KERNELS", None)
    command = [sys.executable, "-m", "pytest", str(KERNEL_TESTS), "-q", "-rfE", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command, cwd=KERNEL_TESTS.parent.parent, env=env, capture_output=True, text=True, timeout=1200
    )
    # The subprocess's own report, failures and all, is the message when it fails.
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-30000:]}\n{result.stderr[-5000:]}"
    )
