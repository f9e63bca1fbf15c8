"""Chat with an instruction-tuned Llama model; each answer is printed as it is generated.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/ --tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model
    python example_chat_completion.py --ckpt_dir tiny-llama    # after `python -m llama.tiny`: random text

--nproc_per_node is the model's number of shards (consolidated.NN.pth files); plain `python` runs one.
--tools runs one tool-calling dialog instead (Llama 3.1+ or Llama 4): the model calls brave_search, the
script answers with a canned search result, and the model answers the user.
--image PATH asks a Llama 4 model about one image instead (needs Pillow: pip install "llama-reference[vision]").
"""

import json
import sys
from typing import Optional

import fire
import torch.distributed as dist

from llama import Dialog, Llama
from llama.distributed import exit_on_user_error


def main(  # flags that may be None are typed as fire shows them in --help: `str = None` is Optional[str]
    ckpt_dir: str,
    tokenizer_path: str = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: int = None,
    quantize: str = None,
    compile: bool = False,
    tools: bool = False,
    image: str = None,
):
    """Run four dialogs and print each answer as it is generated.

    Args:
        ckpt_dir: the model's folder (params.json and consolidated.NN.pth, or a Hugging Face folder).
        tokenizer_path: its tokenizer.model; by default the one in or beside ckpt_dir.
        temperature: sampling temperature; 0 picks the likeliest token (greedy).
        top_p: sample from the smallest set of tokens whose probabilities add up to top_p.
        max_seq_len: the context length: dialog and answer together, in tokens.
        max_batch_size: the most dialogs generated together.
        max_gen_len: the most tokens per answer; None: up to the end of the context.
        quantize: None, or int8 (or another mode Llama.build takes): quantized weights, less memory.
        compile: faster decoding: CUDA graphs on a GPU, torch.compile on a CPU (a minute to compile first).
        tools: run one tool-calling dialog instead (Llama 3.1+ or Llama 4).
        image: an image file to ask about instead (Llama 4 with vision).
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        quantize=quantize,
        compile=compile,
    )

    if tools:
        tool_dialog(generator, temperature, top_p, max_gen_len)
        return

    dialogs: list[Dialog] = [
        [{"role": "user", "content": "What is a good recipe for a quick vegetable soup?"}],
        [
            {"role": "user", "content": "I am visiting Lisbon for two days."},
            {"role": "assistant", "content": "Lovely! Would you like ideas for sights, food, or both?"},
            {"role": "user", "content": "Mostly food. What should I try?"},
        ],
        [
            {"role": "system", "content": "Answer in exactly one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "system", "content": "You are a patient tutor who explains with small examples."},
            {"role": "user", "content": "What does a Python list comprehension do?"},
        ],
    ]
    if image is not None:
        question = [
            {"type": "image", "image": image},
            {"type": "text", "text": "Describe this image in two sentences."},
        ]
        dialogs = [[{"role": "user", "content": question}]]
    main_rank = dist.get_rank() == 0  # every rank takes part in generating; one prints
    for dialog in dialogs:
        if main_rank:
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {shown(msg['content'])}\n")
            print("> Assistant: ", end="", flush=True)
        pieces = generator.chat_completion_stream(dialog, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for piece in pieces:
            if main_rank:
                print(piece, end="", flush=True)
        if main_rank:
            print("\n\n==================================\n")


def shown(content) -> str:
    """A message's content as text, an image as its path."""
    if isinstance(content, str):
        return content
    return "".join(item["text"] if item["type"] == "text" else f"[image: {item['image']}] " for item in content)


def tool_dialog(generator: Llama, temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    """Call, run the tool, feed its result back, get the answer: the loop of an agent, with a canned tool."""
    dialog: Dialog = [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search\n\nYou are a helpful assistant."},
        {"role": "user", "content": "Search the web: who won the 2022 FIFA World Cup?"},
    ]
    main_rank = dist.get_rank() == 0
    for _ in range(3):
        reply = generator.chat_completion([dialog], temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        reply = reply[0]["generation"]
        dialog.append(reply)
        calls = reply.get("tool_calls", [])
        if main_rank:
            print(f"> Assistant ({reply['stop_reason']}): {reply['content'] or calls}\n")
        if not calls:
            break
        for call in calls:  # a real agent runs the tool here; this one answers every call the same way
            result = {
                "tool": call["tool_name"],
                "arguments": call["arguments"],
                "result": "Argentina won, on penalties.",
            }
            dialog.append({"role": "ipython", "content": json.dumps(result)})
            if main_rank:
                print(f"Ipython: {dialog[-1]['content']}\n")


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="replace")  # a random-weight model writes any character at all
    with exit_on_user_error():  # a wrong flag or folder: its message, once, without a traceback
        fire.Fire(main)
