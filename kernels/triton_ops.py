"""The Triton ops that kernels/__init__.py dispatches to, one import for both: rms_norm and attention.

Each kernel lives in a module of its own beside this one (named triton_*, since a submodule called
kernels.rms_norm would replace the function kernels.rms_norm on the package); importing this imports triton.
"""

from kernels.triton_attention import attention, attention_decode, attention_prefill
from kernels.triton_rms_norm import rms_norm

__all__ = ["attention", "attention_decode", "attention_prefill", "rms_norm"]
