"""Loading does not hold a second copy of the weights: peak RSS against the checkpoint's size."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load_memory import measure, write_model  # noqa: E402

# What a build holds whatever the model's size (tokenizer, fairscale's groups, allocator slack): about 45 MB here.
FIXED = 64 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-200mb")
    return path, write_model(path, dim=1024, n_layers=8, vocab_size=512)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_of_a_same_dtype_load_stays_near_the_checkpoint_size(checkpoint):
    path, size = checkpoint
    r = measure(path, "bfloat16")
    assert r["after_build"] < 0.1 * size + FIXED  # the weights are the file's pages, mapped, not read yet
    assert r["peak"] < 1.2 * size + FIXED  # after a forward pass has touched every weight


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_float32_load_of_a_bfloat16_checkpoint_makes_no_copy_beyond_the_float32_weights(checkpoint):
    path, size = checkpoint
    r = measure(path, "float32")
    # float32 weights are 2x the file; the file's mapped pages add at most 1x while they are converted
    assert r["peak"] < 3.2 * size + FIXED
