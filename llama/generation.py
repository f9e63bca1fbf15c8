"""Llama: build a model from Meta's checkpoint folder, then generate text with it."""

import atexit
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.chat_format import ChatFormat, Dialog, Message, has_special_tags
from llama.checkpoint import build_transformer, find_tokenizer, model_args, read_params, settings_file, shard_paths
from llama.cpu import choose_cpu_matmul
from llama.fast import compile_decode, cuda_graph_decode
from llama.model import Transformer
from llama.quantize import quantize_int8
from llama.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # with logprobs: each generated token decoded on its own
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]
    logprobs: list[float]


# Meta's Llama 2 answer to a dialog that writes the chat format's own tags ([INST], <<SYS>>, ...).
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def default_device() -> torch.device:
    """CUDA when present, else CPU; LLAMA_DEVICE (e.g. "cpu", "cuda:1") chooses."""
    name = os.environ.get("LLAMA_DEVICE")
    if name:
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"LLAMA_DEVICE={name!r} is not a device; use e.g. cpu or cuda") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that have it, else float16; bfloat16 on CPU; LLAMA_DTYPE chooses."""
    name = os.environ.get("LLAMA_DTYPE")
    if name:
        if name not in DTYPES:
            raise ValueError(f"LLAMA_DTYPE={name!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def init_distributed(model_parallel_size: Optional[int], device: torch.device) -> tuple[int, int]:
    """Join the process group (torchrun's, or a single process of our own) and fairscale's
    model-parallel groups; returns (model-parallel rank, model-parallel size)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
            dist.init_process_group(backend)
        else:  # plain `python script.py`: a group of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Tear the group down before the interpreter does: gloo's threads otherwise can abort the exit
        # ("terminate called without an active exception") after all the work is done.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    world = dist.get_world_size()
    if model_parallel_size is not None and (model_parallel_size < 1 or world % model_parallel_size):
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs a multiple of that many processes, but there are "
            f"{world}: run with torchrun --nproc_per_node {model_parallel_size}"
        )
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(model_parallel_size or world)
    elif model_parallel_size not in (None, fs_init.get_model_parallel_world_size()):
        raise ValueError(
            f"model parallelism is already set up with size {fs_init.get_model_parallel_world_size()} in this "
            f"process; model_parallel_size={model_parallel_size} cannot change it"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Optional[Union[str, Path]],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
    ) -> "Llama":
        """Load a checkpoint folder and its tokenizer: Meta's (params.json + consolidated.NN.pth, also
        under original/) or a Hugging Face one (config.json + safetensors). tokenizer_path None: the
        tokenizer.model in the folder, under original/, or beside it.

        device: default CUDA when present, else CPU (or LLAMA_DEVICE); dtype: default bfloat16 where
        supported (or LLAMA_DTYPE). quantize="int8": int8 weight-only linear layers (llama/quantize.py).
        compile=True: faster decoding (llama/fast.py), the one-token step recorded as CUDA graphs on a GPU,
        torch.compile'd on a CPU (its first steps then take a minute or so to compile).
        Under torchrun every process loads its model-parallel share.
        """
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize={quantize!r} is not supported: use None or 'int8'")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ckpt_dir = Path(ckpt_dir)
        params = read_params(ckpt_dir)
        shard_paths(ckpt_dir)  # fail on a folder without shards before spending time on the rest
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(ckpt_dir)
        tokenizer = Tokenizer(str(tokenizer_path))

        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or default_dtype(device)
        rank, world = init_distributed(model_parallel_size, device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(seed)  # the same on every rank, so that all ranks sample the same tokens

        source = settings_file(ckpt_dir)
        args = model_args(params, str(source), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{source} has vocab_size {args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: pass the tokenizer.model that came with this model"
            )
        model = build_transformer(ckpt_dir, args, device, dtype, rank, world)
        if quantize == "int8":
            model = quantize_int8(model)
        model = choose_cpu_matmul(model)  # bfloat16 on a CPU: the faster of two matrix-product paths, measured
        if compile:
            model = cuda_graph_decode(model) if device.type == "cuda" else compile_decode(model)
        return Llama(model, tokenizer, seed=seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        # Token ids that end a generated sequence (not output themselves); the tokenizer's by default.
        self.stop_tokens: list[int] = list(tokenizer.stop_tokens)
        self.device = model.tok_embeddings.weight.device
        # Sampling draws from this object's own generator: the same seed gives the same samples on a fresh
        # object whatever else used torch's global RNG, and every model-parallel rank draws the same tokens.
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._run_id = 0  # which generation owns the KV cache; a paused stream checks it when resumed

    # -- Generation over token ids ---------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt by up to max_gen_len tokens; returns (tokens, logprobs or None).

        A sequence ends at its first stop token (not included), at max_gen_len, or at max_seq_len.
        logprobs: the log-probability of each returned token; echo: return the prompt tokens too.
        """
        prompt_tokens = self._check_prompt_tokens(prompt_tokens, "prompt_tokens")
        max_gen_len = _check_max_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        return self._generate(prompt_tokens, max_gen_len, temperature, top_p, bool(logprobs), bool(echo))

    def generate_stream(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> Iterator[list[list[int]]]:
        """Like generate, but yields as it goes: at each step, a list with the new tokens of every prompt
        ([] for a prompt that gave none this step). Concatenated per prompt they are generate's tokens.

        Arguments are checked here, before the first step. One generation at a time per Llama object:
        a stream paused while another call runs raises RuntimeError when resumed.
        """
        prompt_tokens = self._check_prompt_tokens(prompt_tokens, "prompt_tokens")
        max_gen_len = _check_max_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        batch, steps = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs=False, echo=False)
        return self._stream_tokens(batch, steps)

    # -- Text and chat -----------------------------------------------------------------------------------------

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; max_gen_len None means up to max_seq_len - 1 tokens."""
        prompt_tokens = self._encode_prompts(prompts)
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        tokens, token_logprobs = self._generate(
            prompt_tokens, max_gen_len, temperature, top_p, bool(logprobs), bool(echo)
        )
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": self._token_pieces(t), "logprobs": lp}
                for t, lp in zip(tokens, token_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """The assistant's next message for each dialog (a list of {"role", "content"} messages)."""
        if isinstance(dialogs, (str, Mapping)) or not isinstance(dialogs, Sequence):
            raise ValueError("dialogs must be a list of dialogs, each a list of {'role': ..., 'content': ...} messages")
        self._check_batch_size(len(dialogs), "dialogs")
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        encoded = [self._encode_dialog(dialog, i) for i, dialog in enumerate(dialogs)]  # None: refused
        prompt_tokens = [t for t in encoded if t is not None]
        tokens, token_logprobs = [], []
        if prompt_tokens:  # dialogs refused for their special tags cost no compute
            tokens, token_logprobs = self._generate(
                prompt_tokens, max_gen_len, temperature, top_p, bool(logprobs), False
            )
        results: list[ChatPrediction] = []
        generated = iter(zip(tokens, token_logprobs or [None] * len(tokens)))
        for prompt in encoded:
            t, lp = next(generated) if prompt is not None else ([], [])
            content = self.tokenizer.decode(t) if prompt is not None else UNSAFE_ERROR
            result: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result.update(tokens=self._token_pieces(t), logprobs=lp)
            results.append(result)
        return results

    def text_completion_stream(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are generated; joined they equal
        text_completion's generation. A piece never ends inside a multi-byte character."""
        prompt_tokens = [self._encode_prompt(prompt, "prompt")]
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        batch, steps = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs=False, echo=False)
        return decode_stream(self.tokenizer, (t for step in self._stream_tokens(batch, steps) for t in step[0]))

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """Yield the assistant's next message for one dialog as text pieces, as they are generated."""
        prompt = self._encode_dialog(dialog, None)
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        if prompt is None:
            return iter([UNSAFE_ERROR])
        batch, steps = self._start([prompt], max_gen_len, temperature, top_p, logprobs=False, echo=False)
        return decode_stream(self.tokenizer, (t for step in self._stream_tokens(batch, steps) for t in step[0]))

    # -- The decoding loop shared by every entry point ---------------------------------------------------------

    def _generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        batch, steps = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        for _ in steps:
            pass
        # One copy to the host for the whole batch, then plain list slicing.
        tokens, ends = batch.tokens.tolist(), batch.stop_pos.tolist()
        all_logprobs = batch.logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, prompt in enumerate(prompt_tokens):
            start = 0 if echo else len(prompt)
            out_tokens.append(tokens[i][start : ends[i]])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start : ends[i]])
        return out_tokens, out_logprobs if logprobs else None

    def _start(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
    ) -> tuple["_Batch", Iterator[int]]:
        """Set up the token buffer for checked prompts; returns it and the iterator that runs the steps."""
        max_seq_len = self.model.params.max_seq_len
        lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(lens), max(lens)
        total_len = min(max_seq_len, max_gen_len + max_prompt_len)  # never past the KV cache

        tokens = torch.zeros((len(prompt_tokens), total_len), dtype=torch.long)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
        prompt_lens = torch.tensor(lens, device=self.device)
        end_pos = (prompt_lens + max_gen_len).clamp(max=total_len)
        batch = _Batch(
            tokens=tokens.to(self.device),
            prompt_lens=prompt_lens,
            end_pos=end_pos,
            stop_pos=end_pos.clone(),
            done=end_pos <= prompt_lens,  # a prompt that fills the context has no room to generate
            new=torch.zeros_like(prompt_lens, dtype=torch.bool),
            stop_tokens=torch.tensor(self.stop_tokens, dtype=torch.long, device=self.device),
            logprobs=torch.zeros((len(prompt_tokens), total_len), device=self.device) if logprobs else None,
        )
        self._run_id += 1
        # With echo and logprobs the prompts' own log-probabilities are returned, so run at least until
        # the longest prompt has been through the model, even if every sequence stopped before.
        min_stop = max_prompt_len - 1 if logprobs and echo else 0
        steps = self._steps(batch, min_prompt_len, total_len, temperature, top_p, min_stop, self._run_id)
        return batch, steps

    def _steps(
        self,
        batch: "_Batch",
        min_prompt_len: int,
        total_len: int,
        temperature: float,
        top_p: float,
        min_stop: int,
        run_id: int,
    ) -> Iterator[int]:
        if min_prompt_len == total_len:  # every prompt fills the context: nothing to generate
            if batch.logprobs is not None:
                self._prompt_logprobs(batch)
            return
        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            if run_id != self._run_id:
                raise RuntimeError(
                    "another generation ran on this Llama object while this stream was paused, and reused its KV "
                    "cache: finish (or drop) one stream before starting the next call"
                )
            self._step(batch, prev_pos, cur_pos, temperature, top_p)
            yield cur_pos
            prev_pos = cur_pos
            # The one host sync per step: stop once every sequence is done.
            if cur_pos >= min_stop and bool(batch.done.all()):
                return

    @torch.inference_mode()
    def _step(self, b: "_Batch", prev_pos: int, cur_pos: int, temperature: float, top_p: float) -> None:
        """Feed positions prev_pos..cur_pos-1 (the prompts' common part at first, then one token) and
        write the token at cur_pos: a sampled one, or the prompt's own where a prompt is that long."""
        # Only log-probabilities need every position's logits; sampling needs the last one.
        logits = self.model(b.tokens[:, prev_pos:cur_pos], prev_pos, last_only=b.logprobs is None)
        if temperature > 0:
            # Subtract the maximum before dividing, and divide by no less than float32's smallest normal
            # number: a tiny temperature then gives the other tokens -inf (probability 0), never 0 / 0.
            last = logits[:, -1]
            scaled = (last - last.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(last.dtype).tiny)
            probs = torch.softmax(scaled, dim=-1)
            next_token = sample_top_p(probs, top_p, self.generator).reshape(-1)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        generated = b.prompt_lens <= cur_pos
        next_token = torch.where(generated, next_token, b.tokens[:, cur_pos])
        b.tokens[:, cur_pos] = next_token
        if b.logprobs is not None:
            b.logprobs[:, prev_pos + 1 : cur_pos + 1] = token_logprobs(logits, b.tokens[:, prev_pos + 1 : cur_pos + 1])
        # Stop tokens count only where this step generated, never inside a prompt.
        live = generated & ~b.done
        stop = live & torch.isin(next_token, b.stop_tokens)
        b.new = live & ~stop
        b.stop_pos = torch.where(stop, cur_pos, b.stop_pos)
        b.done = b.done | stop | (b.end_pos <= cur_pos + 1)

    @torch.inference_mode()
    def _prompt_logprobs(self, b: "_Batch") -> None:
        logits = self.model(b.tokens, 0)
        b.logprobs[:, 1:] = token_logprobs(logits[:, :-1], b.tokens[:, 1:])

    def _stream_tokens(self, b: "_Batch", steps: Iterator[int]) -> Iterator[list[list[int]]]:
        for cur_pos in steps:
            # One host copy per step: the new token where there is one, else -1.
            new = torch.where(b.new, b.tokens[:, cur_pos], -1).tolist()
            if any(t >= 0 for t in new):
                yield [[t] if t >= 0 else [] for t in new]

    # -- Input checks: every user mistake is a ValueError, raised before the KV cache is touched -------------

    def _check_batch_size(self, n: int, name: str) -> None:
        max_batch_size = self.model.params.max_batch_size
        if n == 0:
            raise ValueError(f"{name} is empty: pass at least one")
        if n > max_batch_size:
            raise ValueError(
                f"{n} {name} but max_batch_size is {max_batch_size}: pass at most {max_batch_size} at a time, "
                "or build the Llama with a larger max_batch_size"
            )

    def _check_prompt_tokens(self, prompt_tokens: list[list[int]], name: str) -> list[list[int]]:
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise ValueError(f"{name} must be a list of prompts, each a list of token ids (ints)")
        self._check_batch_size(len(prompt_tokens), name)
        return [self._check_prompt(prompt, f"{name}[{i}]") for i, prompt in enumerate(prompt_tokens)]

    def _check_prompt(self, prompt: list[int], name: str) -> list[int]:
        vocab_size, max_seq_len = self.model.params.vocab_size, self.model.params.max_seq_len
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise ValueError(f"{name} must be a list of token ids (ints), got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"{name} is empty: a prompt needs at least one token (e.g. the BOS token)")
        if len(prompt) > max_seq_len:
            raise ValueError(
                f"{name} is {len(prompt)} tokens long but max_seq_len is {max_seq_len}: shorten it, "
                "or build the Llama with a larger max_seq_len"
            )
        if not all(type(t) is int for t in prompt):  # the fast path; numpy or other integers are converted
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise ValueError(f"{name} holds {t!r}, which is not a token id: token ids are ints")
            prompt = [int(t) for t in prompt]
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{name} holds token id {lo if lo < 0 else hi}, outside this model's vocabulary "
                f"0..{vocab_size - 1}: were the ids made by another tokenizer?"
            )
        return list(prompt)

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
        self._check_batch_size(len(prompts), "prompts")
        return [self._encode_prompt(prompt, f"prompts[{i}]") for i, prompt in enumerate(prompts)]

    def _encode_prompt(self, prompt: str, name: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"{name} is empty: give some text to complete")
        return self._check_prompt(self.tokenizer.encode(prompt, bos=True, eos=False), name)

    def _encode_dialog(self, dialog: Dialog, index: Optional[int]) -> Optional[list[int]]:
        """The prompt tokens of a dialog, or None for a Llama 2 dialog refused for its special tags."""
        name = "dialog" if index is None else f"dialogs[{index}]"
        if isinstance(dialog, (str, Mapping)) or not isinstance(dialog, Sequence):
            raise ValueError(f"{name} must be a list of messages, each {{'role': ..., 'content': ...}}")
        if len(dialog) == 0:
            raise ValueError(f"{name} is empty: it needs at least one user message")
        for j, message in enumerate(dialog):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"{name}[{j}] must be a dict with a 'role' string and a 'content' string")
            if not isinstance(message.get("content"), str):
                raise ValueError(
                    f"{name}[{j}]['content'] must be a string, got {type(message.get('content')).__name__}"
                )
        try:
            tokens = self.formatter.encode_dialog_prompt(dialog)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{name} is malformed: {e}") from None
        if self.formatter.style == "llama2" and has_special_tags(dialog):
            return None  # refused, whatever its length; Llama 3's format takes the tags as plain text
        return self._check_prompt(tokens, name)

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        if max_gen_len is None:
            return self.model.params.max_seq_len - 1
        return _check_max_gen_len(max_gen_len)

    def _token_pieces(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in tokens]


def decode_stream(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Decode token ids as they arrive into text pieces that, joined, equal tokenizer.decode(all ids).

    A piece never ends inside a multi-byte character: text that ends in U+FFFD is held back until the
    character's remaining bytes arrive (or the tokens run out, for bytes that are simply invalid).
    """
    # Each decode starts one token before the unsent text, so that a tokenizer which drops the leading
    # space of a decode's first word (SentencePiece) still gives that space.
    ids: list[int] = []
    prefix, read = 0, 0
    for token in tokens:
        ids.append(token)
        sent = tokenizer.decode(ids[prefix:read])
        text = tokenizer.decode(ids[prefix:])
        if len(text) > len(sent) and not text.endswith("\ufffd"):
            yield text[len(sent) :]
            prefix, read = read, len(ids)
    text, sent = tokenizer.decode(ids[prefix:]), tokenizer.decode(ids[prefix:read])
    if len(text) > len(sent):
        yield text[len(sent) :]


@dataclass
class _Batch:
    """The state of one batched generation, all on the model's device; bs = number of prompts."""

    tokens: torch.Tensor  # (bs, total_len): each prompt, then its generated tokens
    prompt_lens: torch.Tensor  # (bs,)
    end_pos: torch.Tensor  # (bs,): the first position a sequence may not fill (max_gen_len, the context)
    stop_pos: torch.Tensor  # (bs,): where each output ends: its first generated stop token, else end_pos
    done: torch.Tensor  # (bs,) bool
    new: torch.Tensor  # (bs,) bool: the last step gave this sequence a token to output
    stop_tokens: torch.Tensor  # (n_stop,)
    logprobs: Optional[torch.Tensor]  # (bs, total_len): log-probability of each token, when asked for


def _check_sampling(temperature: float, top_p: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a number >= 0 (0 for greedy decoding), got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 for greedy decoding), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 samples from every token), got {top_p!r}")


def _check_max_gen_len(max_gen_len: int) -> int:
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, numbers.Integral) or max_gen_len < 1:
        raise ValueError(f"max_gen_len must be a positive integer (number of tokens to generate), got {max_gen_len!r}")
    return int(max_gen_len)


# On a CPU, sorting a 128K-token vocabulary takes tens of milliseconds a step, more than a small model's
# forward; the nucleus is nearly always among the few most likely tokens, so look there first.
CPU_NUCLEUS_CANDIDATES = 1024


def nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of probs (bs, vocab): (probabilities, token ids), most likely first, with
    the tokens outside the nucleus given probability 0. The nucleus is the most likely tokens taken until
    their total reaches p (the token that crosses p is kept), as in Meta's sample_top_p."""
    vocab_size = probs.shape[-1]
    k = vocab_size if probs.is_cuda else min(vocab_size, CPU_NUCLEUS_CANDIDATES)
    if k < vocab_size:
        probs_sort, probs_idx = torch.topk(probs, k, dim=-1)
        if bool((probs_sort.sum(dim=-1) <= p).any()):  # a nucleus may reach past the candidates: sort all
            k = vocab_size
    if k == vocab_size:
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    return probs_sort.masked_fill(mass_before > p, 0.0), probs_idx


def top_p_probs(probs: torch.Tensor, p: float) -> torch.Tensor:
    """probs (bs, vocab) restricted to the nucleus and renormalised; every other token has probability 0."""
    if p >= 1:
        return probs / probs.sum(dim=-1, keepdim=True)
    probs_sort, probs_idx = nucleus(probs, p)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort / probs_sort.sum(dim=-1, keepdim=True))


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: one token id per row of probs (bs, vocab), drawn from the smallest set of most
    likely tokens whose probabilities add up to p. Returns (bs, 1), as Meta's does."""
    if p >= 1:  # every token is in the nucleus: no sorting needed
        return torch.multinomial(probs, num_samples=1, generator=generator)
    probs_sort, probs_idx = nucleus(probs, p)
    # multinomial draws in proportion to the weights, so the nucleus needs no renormalising
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position: logits (bs, n, vocab), tokens (bs, n) -> (bs, n)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
