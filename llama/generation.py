"""Llama: build a model from Meta's checkpoint folder, then generate text with it."""

import os
from pathlib import Path
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.checkpoint import build_transformer, find_tokenizer, model_args, read_params, shard_paths
from llama.model import Transformer
from llama.tokenizer import Tokenizer

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


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Optional[Union[str, Path]],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
    ) -> "Llama":
        """Load Meta's checkpoint folder (params.json + consolidated.NN.pth) and its tokenizer.

        device: default CUDA when present, else CPU (or LLAMA_DEVICE); dtype: default bfloat16 where
        supported (or LLAMA_DTYPE). Under torchrun every process loads its model-parallel share.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ckpt_dir = Path(ckpt_dir)
        params = read_params(ckpt_dir)
        shard_paths(ckpt_dir)  # fail on a folder without shards before spending time on the rest
        tokenizer = Tokenizer(str(tokenizer_path if tokenizer_path is not None else find_tokenizer(ckpt_dir)))

        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or default_dtype(device)
        rank, world = init_distributed(model_parallel_size, device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(seed)  # the same on every rank, so that all ranks sample the same tokens

        args = model_args(params, str(ckpt_dir / "params.json"), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{ckpt_dir}/params.json has vocab_size {args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: pass the tokenizer.model that came with this model"
            )
        model = build_transformer(ckpt_dir, args, device, dtype, rank, world)
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
