"""Complete a few prompts with a pretrained (base) Llama model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/ --tokenizer_path Meta-Llama-3-8B/tokenizer.model
    python example_text_completion.py --ckpt_dir tiny-llama    # after `python -m llama.tiny`: random text

--nproc_per_node is the model's number of shards (consolidated.NN.pth files); plain `python` runs one.
"""

import sys
from typing import Optional

import fire
import torch.distributed as dist

from llama import Llama


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,  # None: the tokenizer.model in or beside ckpt_dir
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    compile: bool = False,  # faster decoding: CUDA graphs on a GPU, torch.compile on a CPU
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        compile=compile,
    )

    # Base models continue text, so each prompt is written to be continued.
    prompts: list[str] = [
        "The most useful thing I learned in my first year of programming is",
        "In plain words, photosynthesis is the way plants ",
        # A few-shot prompt: the pattern tells the model what to write next.
        """English to Spanish:

cat => gato
house => casa
good morning =>""",
        """A note to the volunteers who ran the library book sale:

Thank you for""",
    ]
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if dist.get_rank() != 0:  # every rank takes part in generating; one prints
        return
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="replace")  # a random-weight model writes any character at all
    fire.Fire(main)
