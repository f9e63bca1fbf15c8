"""Tiny random checkpoints and a plain reference decoder for the generation tests."""

import importlib.util
from pathlib import Path
from typing import Optional

import pytest
import torch

from llama import Llama
from llama.model import ModelArgs, Transformer
from llama.tiny import TINY_PARAMS, random_state_dict, write_byte_tokenizer, write_checkpoint
from llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on a loaded 2-core machine, OpenMP threads waiting for
    each other make millisecond steps take a hundred times longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def package_file(package: str, relative: str) -> Optional[Path]:
    """A data file shipped inside an installed package, or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def llama3_tokenizer_path() -> Optional[Path]:
    """Meta's Llama 3 tokenizer.model (tiktoken BPE), as shipped in the llama-models package."""
    return package_file("llama_models", "llama3/tokenizer.model")


def llama2_tokenizer_path() -> Optional[Path]:
    """A Llama 2-style SentencePiece model (32000 tokens, <s> = 1, </s> = 2), shipped in mistral-common."""
    return package_file("mistral_common", "data/tokenizer.model.v1")


def write_tiny(path: Path, *, std: float = 0.5, seed: int = 0, tokenizer: Optional[Path] = None, **params) -> Path:
    """A random-weight checkpoint folder. A std well above the usual 0.02 makes the logits peaked, so
    that greedy decoding does not hinge on near-ties that float rounding could flip."""
    path.mkdir(parents=True, exist_ok=True)
    tok_file = path / "tokenizer.model"
    if tokenizer is None:
        write_byte_tokenizer(tok_file)  # 256 byte tokens + 256 special tokens
    else:
        tok_file.write_bytes(tokenizer.read_bytes())
    params = dict(TINY_PARAMS, vocab_size=Tokenizer(str(tok_file)).n_words, **params)
    state = random_state_dict(ModelArgs(**params), seed=seed, std=std, dtype=torch.float32)
    write_checkpoint(path, params, state)
    return path


def build(path: Path, max_seq_len: int = 64, max_batch_size: int = 4, seed: int = 1) -> Llama:
    return Llama.build(str(path), None, max_seq_len, max_batch_size, seed=seed, device="cpu", dtype="float32")


def plain_greedy(model: Transformer, prompt: list[int], max_gen_len: int, stop_tokens: list[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole sequence through the model from position 0 at
    every step, no KV cache reused, one prompt at a time."""
    tokens = list(prompt)
    end = min(len(prompt) + max_gen_len, model.params.max_seq_len)
    while len(tokens) < end:
        logits = model(torch.tensor([tokens]), 0)
        next_token = int(logits[0, -1].argmax())
        if next_token in stop_tokens:
            break
        tokens.append(next_token)
    return tokens[len(prompt) :]


def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logits of each step), decoded one token at a time through the KV cache as generation does."""
    logits = [model(prompt, 0, last_only=True)]
    tokens = [logits[-1][:, -1].argmax(-1, keepdim=True)]
    for pos in range(prompt.shape[1], prompt.shape[1] + new_tokens - 1):
        logits.append(model(tokens[-1], pos, last_only=True))
        tokens.append(logits[-1][:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.cat(logits, dim=1)


def teacher_forced(model: Transformer, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of each position after the prompt, the sequence fed one token at a time as generation does."""
    logits = [model(sequence[:, :prompt_len], 0, last_only=True)]
    for pos in range(prompt_len, sequence.shape[1] - 1):
        logits.append(model(sequence[:, pos : pos + 1], pos, last_only=True))
    return torch.cat(logits, dim=1)
