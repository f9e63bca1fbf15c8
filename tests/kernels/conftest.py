"""The Triton kernel tests, in a pytest process of their own: in Triton's interpreter on CPU tensors, or
compiled for the GPU on CUDA tensors where there is one (kernel_device.DEVICE).

`pytest tests/kernels` runs them here, with TRITON_INTERPRET=1 set before the kernels are defined unless
CUDA is available; `pytest tests` leaves this folder to tests/test_kernels.py, which runs it as such a
subprocess, in the interpreter and, with a GPU, compiled as well.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent.resolve()


def _asked_for(config: pytest.Config) -> bool:
    # True when pytest was pointed at this folder or a file in it, not at a folder above it.
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    if not _asked_for(config) or "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return
    # triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when llama_kernels.triton_ops is imported.
    if "llama_kernels.triton_ops" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            "llama_kernels.triton_ops was imported before TRITON_INTERPRET=1 was set; run the kernel tests in "
            "their own process: TRITON_INTERPRET=1 pytest tests/kernels"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    # Collected as part of a larger run, these tests would run a second time, and in a process that may
    # already have imported the kernels compiled for a GPU; tests/test_kernels.py runs them instead.
    if not _asked_for(config):
        return True
    return None
