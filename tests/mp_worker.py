"""Run under torchrun by tests: build a Llama from a checkpoint folder with model parallelism on CPU and
save rank 0's logits for the given tokens.

    torchrun --standalone --nproc_per_node N tests/mp_worker.py CKPT_DIR TOKENS.pt OUT.pt
    torchrun --standalone --nproc_per_node N tests/mp_worker.py --many TOKENS.pt OUT_DIR CKPT_DIR...  # OUT_DIR/I.pt

TOKENS.pt holds the tokens, or (Llama 4 with images) a dict of tokens, images and image_mask for Transformer.forward.
"""

import sys

import torch

from llama import Llama


def main(ckpt_dir: str, tokens_path: str, out_path: str) -> None:
    inputs = torch.load(tokens_path, weights_only=True)
    tokens, images = (inputs.pop("tokens"), inputs) if isinstance(inputs, dict) else (inputs, {})
    llama = Llama.build(
        ckpt_dir, None, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0], device="cpu", dtype="float32"
    )
    logits = llama.model(tokens, 0, **images)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)


def main_many(tokens_path: str, out_dir: str, *ckpt_dirs: str) -> None:
    # One process group, several models built one after another: saves a torchrun start per checkpoint.
    for i, ckpt_dir in enumerate(ckpt_dirs):
        main(ckpt_dir, tokens_path, f"{out_dir}/{i}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--many":
        main_many(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
