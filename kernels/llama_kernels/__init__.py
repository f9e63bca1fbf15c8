"""Fast ops that llama/model.py calls: Triton kernels for CUDA tensors, PyTorch fallbacks otherwise.

The one dispatch point is `_use_triton`. LLAMA_KERNELS=triton or LLAMA_KERNELS=torch forces a backend
(Triton on CPU tensors runs only in Triton's interpreter, TRITON_INTERPRET=1 set before import).
"""

import os

import torch

from llama_kernels import fallback

_BACKENDS = ("auto", "triton", "torch")


def _use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get("LLAMA_KERNELS", "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"LLAMA_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}; unset it or pick one.")
    if choice == "auto":
        return x.is_cuda and _triton_ops() is not None
    if choice == "triton":
        check_triton_device(x.device)
    return choice == "triton"


def check_triton_device(device: torch.device) -> None:
    """Raises a ValueError naming the fix when LLAMA_KERNELS=triton cannot run the kernels on `device`."""
    if os.environ.get("LLAMA_KERNELS", "auto").lower() != "triton":
        return
    if _triton_ops() is None:
        raise ValueError("LLAMA_KERNELS=triton but triton cannot be imported; pip install triton, or unset it.")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"LLAMA_KERNELS=triton asks for the Triton kernels on a {device.type} device, where Triton runs only "
            "in its interpreter (TRITON_INTERPRET=1 set before Python starts; slow, for tests); unset "
            "LLAMA_KERNELS to use the PyTorch fallbacks here."
        )


_TRITON = []


def _triton_ops():
    if not _TRITON:
        try:
            from llama_kernels import triton_ops
        except ImportError:
            triton_ops = None
        _TRITON.append(triton_ops)
    return _TRITON[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, normalised in float32 and cast back before scaling."""
    if _use_triton(x):
        return _triton_ops().rms_norm(x, weight, eps)
    return fallback.rms_norm(x, weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Causal GQA attention: q (bs, seqlen, n_heads, hd) at start_pos over k, v (bs, start_pos+seqlen, n_kv, hd)."""
    if _use_triton(q):
        return _triton_ops().attention(q, k, v, start_pos)
    return fallback.attention(q, k, v, start_pos)
