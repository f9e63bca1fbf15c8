"""Loading does not hold a second copy of the weights: RSS against the checkpoint's size."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from load_memory import measure, write_model  # noqa: E402

# What a build holds whatever the model's size (tokenizer, fairscale's groups, allocator slack): about 45 MB here.
FIXED = 64 << 20
# On a CPU, bfloat16 weights are packed into oneDNN's layout at build (llama/cpu.py) where that is faster, and the
# mapped file's pages released: oneDNN's own allocations for that measured 130-170 MB here, whatever the model.
PACKING = 192 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 880 MB: large enough that a second copy of the weights would stand out from the fixed allowances
    path = tmp_path_factory.mktemp("ckpt-880mb")
    return path, write_model(path, dim=2048, n_layers=8, vocab_size=512)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_of_a_same_dtype_load_stays_near_the_checkpoint_size(checkpoint):
    path, size = checkpoint
    r = measure(path, "bfloat16")
    # the weights once: packed where packing is faster, else the file's pages, mapped
    assert r["after_build"] < 1.1 * size + FIXED + PACKING
    assert r["peak"] < 1.25 * size + FIXED + PACKING  # after a forward pass has touched every weight


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_float32_load_of_a_bfloat16_checkpoint_makes_no_copy_beyond_the_float32_weights(checkpoint):
    path, size = checkpoint
    r = measure(path, "float32")
    # float32 weights are 2x the file; the file's mapped pages add at most 1x while they are converted
    assert r["peak"] < 3.2 * size + FIXED
