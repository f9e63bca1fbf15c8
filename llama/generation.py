"""Llama: build a model from Meta's checkpoint folder, then generate text with it."""

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypedDict, Union

import torch

from llama.chat_format import ChatFormat, Dialog, Message, StopReason, has_special_tags
from llama.checkpoint import build_transformer, find_tokenizer, resolve
from llama.cpu import choose_cpu_matmul
from llama.distributed import DTYPES, default_device, default_dtype, init_distributed  # noqa: F401
from llama.fast import compile_decode, cuda_graph_decode
from llama.model import Transformer
from llama.quantize import quantize_int8
from llama.sampling import nucleus, sample_top_p, token_logprobs, top_p_probs  # noqa: F401
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # with logprobs: each generated token decoded on its own
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: Message  # with "stop_reason", and "tool_calls" when the model called tools
    tokens: list[str]
    logprobs: list[float]


# Meta's Llama 2 answer to a dialog that writes the chat format's own tags ([INST], <<SYS>>, ...).
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


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
        ckpt = resolve(ckpt_dir)  # settings read, weight files listed: a bad folder fails before anything is loaded
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(ckpt)
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

        source = ckpt.settings
        args = ckpt.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{source} has vocab_size {args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: pass the tokenizer.model that came with this model"
            )
        model = build_transformer(ckpt, args, device, dtype, rank, world)
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
        tool_prompt_format: str = "json",
    ) -> list[ChatPrediction]:
        """The assistant's next message for each dialog (a list of {"role", "content"} messages), with its
        "stop_reason" ("end_of_turn", "end_of_message": it waits for a tool's result, "out_of_tokens") and,
        when the model called tools (Llama 3.1+, Llama 4), "tool_calls". tool_prompt_format: how the
        dialogs' calls to functions are written ("json", "function_tag" or "python_list")."""
        if isinstance(dialogs, (str, Mapping)) or not isinstance(dialogs, Sequence):
            raise ValueError("dialogs must be a list of dialogs, each a list of {'role': ..., 'content': ...} messages")
        self._check_batch_size(len(dialogs), "dialogs")
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        encoded = [self._encode_dialog(d, i, tool_prompt_format) for i, d in enumerate(dialogs)]  # None: refused
        prompt_tokens = [t for t in encoded if t is not None]
        tokens, token_logprobs, stops = [], [], []
        if prompt_tokens:  # dialogs refused for their special tags cost no compute
            batch, steps = self._start(prompt_tokens, max_gen_len, temperature, top_p, bool(logprobs), echo=False)
            for _ in steps:
                pass
            tokens, token_logprobs, stops = _chat_outputs(batch, prompt_tokens)
        results: list[ChatPrediction] = []
        generated = iter(zip(tokens, token_logprobs, stops))
        for prompt in encoded:
            if prompt is None:
                t, lp, message = [], [], _refusal()
            else:
                t, lp, stop = next(generated)
                message = self._reply(t, self.formatter.stop_reason(stop))
            result: ChatPrediction = {"generation": message}
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
        tool_prompt_format: str = "json",
    ) -> "ChatStream":
        """Yield the assistant's next message for one dialog as text pieces, as they are generated (a tool
        call comes as its raw text). Once the pieces run out, the stream's `message` is the message
        chat_completion gives: content, stop_reason and tool_calls."""
        prompt = self._encode_dialog(dialog, None, tool_prompt_format)
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p)
        if prompt is None:
            return ChatStream(iter([UNSAFE_ERROR]), _refusal)
        batch, steps = self._start([prompt], max_gen_len, temperature, top_p, logprobs=False, echo=False)
        pieces = decode_stream(self.tokenizer, (t for step in self._stream_tokens(batch, steps) for t in step[0]))

        def message() -> Message:
            tokens, _, stops = _chat_outputs(batch, [prompt])
            return self._reply(tokens[0], self.formatter.stop_reason(stops[0]))

        return ChatStream(pieces, message)

    def _reply(self, tokens: list[int], stop_reason: StopReason) -> Message:
        """A generated reply as an assistant message: its tool calls (content "") when it holds some, else its
        text as generated, as Meta's chat_completion gives it (llama-models' parser also strips end spaces)."""
        message = self.formatter.decode_assistant_message(tokens, stop_reason)
        if message.get("tool_calls"):
            return message
        return {"role": "assistant", "content": self.tokenizer.decode(tokens), "stop_reason": stop_reason}

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

    def _encode_dialog(
        self, dialog: Dialog, index: Optional[int], tool_prompt_format: str = "json"
    ) -> Optional[list[int]]:
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
        if dialog[-1]["role"] not in ("user", "ipython", "tool"):
            raise ValueError(
                f"{name} is malformed: its last message is from {dialog[-1]['role']!r}; for the assistant to answer, "
                "it must be from the user (or 'ipython', a tool's result); to score or continue an assistant message, use "
                "ChatFormat.encode_dialog_prompt and generate"
            )
        try:
            tokens = self.formatter.encode_dialog_prompt(dialog, tool_prompt_format)
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


def _refusal() -> Message:
    return {"role": "assistant", "content": UNSAFE_ERROR, "stop_reason": "end_of_turn"}


class ChatStream:
    """chat_completion_stream's answer: iterate for the reply's text pieces; once they run out, `message` is
    the assistant message (content, stop_reason, tool_calls) that chat_completion would give."""

    def __init__(self, pieces: Iterator[str], message: "Callable[[], Message]"):
        self._pieces, self._message = pieces, message
        self.message: Optional[Message] = None

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            if self.message is None:
                self.message = self._message()
            raise


def _chat_outputs(
    batch: "_Batch", prompt_tokens: list[list[int]]
) -> tuple[list[list[int]], list[list[float]], list[Optional[int]]]:
    """Each sequence's generated tokens and their log-probabilities (when computed), as generate gives them,
    and the stop token that ended it (None when it ran out of tokens)."""
    tokens, ends, limits = batch.tokens.tolist(), batch.stop_pos.tolist(), batch.end_pos.tolist()
    all_logprobs = batch.logprobs.tolist() if batch.logprobs is not None else None
    out, out_logprobs, stops = [], [], []
    for i, prompt in enumerate(prompt_tokens):
        out.append(tokens[i][len(prompt) : ends[i]])
        out_logprobs.append(all_logprobs[i][len(prompt) : ends[i]] if all_logprobs is not None else None)
        stops.append(tokens[i][ends[i]] if ends[i] < limits[i] else None)
    return out, out_logprobs, stops


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
