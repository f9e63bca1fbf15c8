"""Where a model runs: its device and dtype (CUDA when present, else CPU; overridable), and the process group
with fairscale's model-parallel groups (torchrun's, or a group of one for a plain `python script.py`)."""

import atexit
import os
from datetime import timedelta
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present, else CPU; LLAMA_DEVICE (e.g. "cpu", "cuda:1") chooses."""
    name = os.environ.get("LLAMA_DEVICE")
    if name:
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"LLAMA_DEVICE={name!r} is not a device; use e.g. cpu or cuda") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that have it, else float16; bfloat16 on CPU; LLAMA_DTYPE chooses."""
    name = os.environ.get("LLAMA_DTYPE")
    if name:
        if name not in DTYPES:
            raise ValueError(f"LLAMA_DTYPE={name!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def init_distributed(model_parallel_size: Optional[int], device: torch.device) -> tuple[int, int]:
    """Join the process group (torchrun's, or a single process of our own) and fairscale's
    model-parallel groups; returns (model-parallel rank, model-parallel size)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
            dist.init_process_group(backend)
        else:  # plain `python script.py`: a group of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(_close_group)
    world = dist.get_world_size()
    if model_parallel_size is not None and (model_parallel_size < 1 or world % model_parallel_size):
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs a multiple of that many processes, but there are "
            f"{world}: run with torchrun --nproc_per_node {model_parallel_size}"
        )
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(model_parallel_size or world)
    elif model_parallel_size not in (None, fs_init.get_model_parallel_world_size()):
        raise ValueError(
            f"model parallelism is already set up with size {fs_init.get_model_parallel_world_size()} in this "
            f"process; model_parallel_size={model_parallel_size} cannot change it"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def _close_group() -> None:
    # Tear the group down before the interpreter does, once every rank is done (a barrier that gives up after a
    # few seconds, e.g. when another rank has failed): gloo's threads otherwise can abort a finished process
    # ("terminate called without an active exception") while another rank still talks to it.
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=10))
        except RuntimeError:
            pass
    dist.destroy_process_group()
