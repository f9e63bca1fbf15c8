"""Run under torchrun by tests: build a Llama from a checkpoint folder with model parallelism on CPU and
save rank 0's logits for the given tokens.

    torchrun --standalone --nproc_per_node N tests/mp_worker.py CKPT_DIR TOKENS.pt OUT.pt
"""

import sys

import torch

from llama import Llama


def main(ckpt_dir: str, tokens_path: str, out_path: str) -> None:
    tokens = torch.load(tokens_path, weights_only=True)
    llama = Llama.build(
        ckpt_dir, None, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0], device="cpu", dtype="float32"
    )
    logits = llama.model(tokens, 0)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
