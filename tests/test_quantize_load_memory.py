"""Quantizing while loading (Llama.build(quantize="int8" | "int4")): each weight is quantized as it is read from
the mapped checkpoint, so the process never holds the floating-point model: its peak RSS during the build stays
within the quantized model plus one layer's weights in bfloat16 (and what any build holds whatever the model)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load_memory import measure, write_model  # noqa: E402

# What a build holds whatever the model's size (tokenizer, fairscale's groups, allocator slack): about 45 MB here.
FIXED = 64 << 20
N_LAYERS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 880 MB in bfloat16, 8 layers of 110 MB: a copy of the floating-point model would stand out
    path = tmp_path_factory.mktemp("ckpt-880mb")
    return path, write_model(path, dim=2048, n_layers=N_LAYERS, vocab_size=512)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("quantize, ratio", [("int8", 0.51), ("int4", 0.28)])
def test_quantizing_while_loading_never_holds_the_bfloat16_model(checkpoint, quantize, ratio):
    path, size = checkpoint
    r = measure(path, "bfloat16", quantize)
    layer = size / N_LAYERS  # one layer's bfloat16 weights (the embedding and output are 2 MB each here)
    assert r["model_bytes"] < ratio * size  # it is the quantized model
    assert r["build_peak"] < r["model_bytes"] + layer + FIXED
    # The file's pages of quantized weights are not kept (they would add the whole 880 MB). What the allocator keeps
    # of the int4 packing's scratch after the build varies from run to run: 40-80 MB over the model was seen.
    assert r["after_build"] < r["model_bytes"] + 2 * FIXED
