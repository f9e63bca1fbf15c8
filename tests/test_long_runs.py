"""Long runs: many successive generations on one Llama object keep resident memory flat."""

import gc

import psutil
import pytest
from generation_helpers import (
    build,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    write_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Resident memory may grow this much over 200 generations after a warm-up. Measured: well under 1 MiB.
# Keeping one sampling step's probabilities per step alive (2 KiB a sequence on this 512-token model)
# grows it by about 24 MiB here, so a per-step leak fails the test.
RSS_BOUND = 8 * 2**20


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_200_generations_keep_resident_memory_flat(tmp_path):
    llama = build(write_tiny(tmp_path, dim=32, n_heads=2, n_kv_heads=1, n_layers=1), max_seq_len=64, max_batch_size=4)
    prompts = ["Tell me", "a story about a", "llama who ate a very long"]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]

    def one(i: int) -> None:
        kind = i % 5
        if kind == 0:
            llama.text_completion(prompts, max_gen_len=48, logprobs=True, echo=True)
        elif kind == 1:
            llama.chat_completion([dialog, dialog], max_gen_len=40, temperature=0)
        elif kind == 2:
            "".join(llama.text_completion_stream(prompts[i % 3], max_gen_len=40))
        elif kind == 3:
            stream = llama.generate_stream([[1, 2, 3]] * 4, max_gen_len=30)
            next(stream)  # abandoned half-way, as a client that disconnects
        else:
            try:
                llama.text_completion([""])
            except ValueError:
                pass

    for i in range(25):
        one(i)
    before = rss()
    for i in range(200):
        one(i)
    growth = rss() - before
    assert growth < RSS_BOUND, f"resident memory grew {growth / 2**20:.1f} MiB over 200 generations"
