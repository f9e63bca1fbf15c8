"""Where the kernel tests put their tensors: the GPU, with the kernels compiled, unless TRITON_INTERPRET=1
asks for Triton's interpreter, which runs them on CPU tensors."""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
