"""Complete a few prompts with a pretrained (base) Llama model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/ --tokenizer_path Meta-Llama-3-8B/tokenizer.model
    python example_text_completion.py --ckpt_dir tiny-llama    # after `python -m llama.tiny`: random text

--nproc_per_node is the model's number of shards (consolidated.NN.pth files); plain `python` runs one.
"""

import sys

import fire
import torch.distributed as dist

from llama import Llama
from llama.distributed import exit_on_user_error


def main(  # flags that may be None are typed as fire shows them in --help: `str = None` is Optional[str]
    ckpt_dir: str,
    tokenizer_path: str = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    quantize: str = None,
    compile: bool = False,
):
    """Complete four prompts and print each completion.

    Args:
        ckpt_dir: the model's folder (params.json and consolidated.NN.pth, or a Hugging Face folder).
        tokenizer_path: its tokenizer.model; by default the one in or beside ckpt_dir.
        temperature: sampling temperature; 0 picks the likeliest token (greedy).
        top_p: sample from the smallest set of tokens whose probabilities add up to top_p.
        max_seq_len: the context length: prompt and completion together, in tokens.
        max_gen_len: the most tokens to generate per prompt; None: up to the end of the context.
        max_batch_size: the most prompts generated together.
        quantize: None, or int8 (or another mode Llama.build takes): quantized weights, less memory.
        compile: faster decoding: CUDA graphs on a GPU, torch.compile on a CPU (a minute to compile first).
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        quantize=quantize,
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
    with exit_on_user_error():  # a wrong flag or folder: its message, once, without a traceback
        fire.Fire(main)
