"""The Triton RMSNorm equals the PyTorch fallback (in Triton's interpreter, or compiled on a GPU), over
Llama's hidden sizes."""

import pytest
import torch
from kernel_device import DEVICE

from llama_kernels import fallback, triton_ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Hidden sizes of Llama 3.2 1B, 3B, Llama 7B/8B, 13B, 70B and Llama 3.1 405B, then sizes no power of two
# divides, which only the row mask handles.
HIDDEN = [2048, 3072, 4096, 5120, 8192, 16384, 77, 1000]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("hidden", HIDDEN, ids=[f"h{h}" for h in HIDDEN])
def test_rms_norm_matches_fallback(hidden: int, dtype: torch.dtype):
    x, weight = _inputs((2, 3, hidden), dtype)
    out = triton_ops.rms_norm(x, weight, 1e-5)
    expected = fallback.rms_norm(x, weight, 1e-5)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    # The normalised value may round one ulp apart (the GPU's rsqrt), and the product with the weight a
    # second: two ulps of float16 (bfloat16's default tolerance already spans two).
    tolerance = dict(rtol=2e-3, atol=1e-5) if dtype == torch.float16 else {}
    torch.testing.assert_close(out, expected, **tolerance)


def test_rms_norm_promotes_like_the_fallback():
    # A float32 weight on bfloat16 activations: normalise, round to bfloat16, then scale in float32.
    x, _ = _inputs((5, 256), torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(256, generator=torch.Generator().manual_seed(1))).to(DEVICE)
    out = triton_ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fallback.rms_norm(x, weight, 1e-6), rtol=1e-2, atol=1e-5)


def test_rms_norm_reads_strided_rows_and_any_leading_shape():
    # Rows of a wider buffer (row stride > hidden), under two leading dimensions.
    wide, weight = _inputs((2, 3, 5, 200), torch.float32)
    x = wide[:, :, :, 50:178]
    out = triton_ops.rms_norm(x, weight[:128], 1e-5)
    assert out.shape == (2, 3, 5, 128) and out.is_contiguous()
    torch.testing.assert_close(out, fallback.rms_norm(x, weight[:128], 1e-5))
    transposed = wide[:, :, :, :128].transpose(0, 2)  # leading dimensions no single stride describes
    torch.testing.assert_close(
        triton_ops.rms_norm(transposed, weight[:128], 1e-5), fallback.rms_norm(transposed, weight[:128], 1e-5)
    )


def test_rms_norm_of_no_rows_is_empty():
    x, weight = _inputs((0, 64), torch.float16)
    assert triton_ops.rms_norm(x, weight, 1e-5).shape == (0, 64)


@pytest.mark.parametrize(
    "x, weight, match",
    [
        (torch.ones(4, 8), torch.ones(7), "weight of shape"),
        (torch.ones(4, 8), torch.ones(1, 8), "weight of shape"),
        (torch.ones(4, 8, dtype=torch.float64), torch.ones(8), "float16, bfloat16 or float32"),
        (torch.ones(4, 8), torch.ones(8, dtype=torch.int32), "float16, bfloat16 or float32"),
        (torch.ones(2, 70000), torch.ones(70000), "hidden size 70000"),
    ],
    ids=["weight-length", "weight-2d", "x-float64", "weight-int", "too-wide"],
)
def test_rms_norm_rejects_bad_input(x: torch.Tensor, weight: torch.Tensor, match: str):
    with pytest.raises(ValueError, match=match):
        triton_ops.rms_norm(x, weight, 1e-5)
