"""The Triton ops that llama_kernels/__init__.py dispatches to, one import for both: rms_norm and attention.

Each kernel lives in a module of its own beside this one (named triton_*, since a submodule called
llama_kernels.rms_norm would replace the function llama_kernels.rms_norm on the package); importing this imports triton.
"""

from llama_kernels.triton_attention import attention, attention_decode, attention_prefill
from llama_kernels.triton_rms_norm import rms_norm

__all__ = ["attention", "attention_decode", "attention_prefill", "rms_norm"]
