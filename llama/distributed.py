"""Where a model runs: its device and dtype (CUDA when present, else CPU; overridable), and the process group
with fairscale's model-parallel groups (torchrun's, or a group of one for a plain `python script.py`)."""

import atexit
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present, else CPU; LLAMA_DEVICE (e.g. "cpu", "cuda:1") chooses."""
    name = os.environ.get("LLAMA_DEVICE")
    if name:
        return check_device(name, f"LLAMA_DEVICE={name!r}", "unset LLAMA_DEVICE or set it to cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: Union[str, torch.device], source: str, fix: str) -> torch.device:
    """device as a torch.device, if the model can run there: a CPU, or a CUDA device this process can see.
    Otherwise a ValueError naming source (what asked for it) and fix, before anything is allocated on it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{source} is not a device: {fix}, or name one such as cpu, cuda or cuda:1") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{source}: {device.type} devices are not supported, only cpu and cuda: {fix}")
    if torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(
            f"{source}, but this torch build ({torch.__version__}) has no CUDA support: {fix}, or install a CUDA "
            "build of torch (https://pytorch.org/get-started/locally/)"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(
            f"{source}, but no CUDA device is visible (driver not loaded, or CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): {fix}"
        )
    if device.index is not None and device.index >= count:
        raise ValueError(f"{source}, but this process sees {count} CUDA device(s), cuda:0..cuda:{count - 1}: {fix}")
    return device


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
            hook = sys.excepthook
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            # torch prefixes every line of every uncaught traceback with "[rank0]: " from here on; in a process that
            # never asked for ranks, the user's own errors are printed as Python prints them.
            sys.excepthook = hook
        atexit.register(_close_group)
    world = dist.get_world_size()
    if model_parallel_size is not None and (model_parallel_size < 1 or world % model_parallel_size):
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs a multiple of that many processes, but there are "
            f"{world}: run with torchrun --nproc_per_node {model_parallel_size}"
        )
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints the group sizes to stdout
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


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For command-line scripts: a mistake of the user's that the library reports (ValueError, FileNotFoundError)
    ends the process with exit status 1 and its message on stderr, without a traceback. Under torchrun a mistake
    every rank makes is printed once, by rank 0; an error of one rank's own (its shard, say) by that rank."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        message = f"{type(e).__name__}: {e}"
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:  # torchrun's failure summary shows this message instead of a link to its documentation
            extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
            with open(error_file, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": extra}}, f)
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            try:  # did every rank fail? they all come here
                dist.monitored_barrier(timeout=timedelta(seconds=5))
                alone = False
            except RuntimeError:
                alone = True
        elif rank != 0 and "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun stops every process once one has failed: if rank 0 fails too, this one never wakes up.
            time.sleep(5)
            alone = True
        else:
            alone = False
        if rank == 0 or alone:
            print(f"{message} (rank {rank})" if alone and rank else message, file=sys.stderr)
        raise SystemExit(1) from None
