"""Llama: build a model from Meta's checkpoint folder, then generate text with it."""

import math
import numbers
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Optional, TypedDict, Union

import torch

from llama.chat_format import ChatFormat, Dialog, Llama2ChatFormat, LLMInput, Message, has_special_tags
from llama.checkpoint import build_transformer, check_parallel_size, find_tokenizer, resolve
from llama.cpu import choose_cpu_matmul
from llama.distributed import DTYPES, check_device, default_device, default_dtype, init_distributed
from llama.fast import compile_decode, cuda_graph_decode
from llama.model import Transformer
from llama.quantize import check_quantize_mode
from llama.sampling import sample, token_logprobs
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


class Output(NamedTuple):
    """One sequence's result: its tokens (the prompt's first with echo), their log-probabilities when asked for,
    and the stop token that ended it (None when it ran out of room: max_gen_len or max_seq_len)."""

    tokens: list[int]
    logprobs: Optional[list[float]]
    stop_token: Optional[int]


# What each batch argument holds, for the error that says so.
BATCHES = {
    "prompt_tokens": "a list of prompts, each a list of token ids (ints)",
    "prompts": "a list of strings (wrap a single prompt in a list)",
    "dialogs": "a list of dialogs, each a list of {'role': ..., 'content': ...} messages",
}


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
        vision: bool = True,
    ) -> "Llama":
        """Load a checkpoint folder and its tokenizer: Meta's (params.json + consolidated.NN.pth, also
        under original/) or a Hugging Face one (config.json + safetensors). tokenizer_path None: the
        tokenizer.model in the folder, under original/, or beside it.

        device: default CUDA when present, else CPU (or LLAMA_DEVICE); dtype: default bfloat16 where
        supported (or LLAMA_DTYPE). quantize="int8" or "int4": weight-only int8 or int4
        (groups of 128) linear layers and experts (llama/quantize.py).
        compile=True: faster decoding (llama/fast.py), the one-token step recorded as CUDA graphs on a GPU,
        torch.compile'd on a CPU (its first steps then take a minute or so to compile).
        vision=False: a Llama 4 folder's vision encoder is not loaded (text only; one line says what it saves).
        Under torchrun every process loads its model-parallel share.
        """
        # The device first: a machine without it fails here, before the checkpoint is read or a group is set up.
        if device is not None:
            device = check_device(device, f"device={str(device)!r}", "pass device='cpu'")
        else:
            device = default_device()
        check_quantize_mode(quantize)
        for name, flag in (("compile", compile), ("vision", vision)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ckpt = resolve(ckpt_dir)  # settings read, weight files listed: a bad folder fails before anything is loaded
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(ckpt)
        tokenizer = Tokenizer(str(tokenizer_path))

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or default_dtype(device)
        source = ckpt.settings
        text_only = {} if vision else {"vision_args": None}  # the loader then skips the vision weights
        args = ckpt.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **text_only)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{source} has vocab_size {args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: pass the tokenizer.model that came with this model"
            )
        if model_parallel_size is not None:  # sizes that cannot be shared fail before a process group is set up
            check_parallel_size(args, 1 if ckpt.is_hf else len(ckpt.shards), model_parallel_size, ckpt.folder)
        rank, world = init_distributed(model_parallel_size, device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(seed)  # the same on every rank, so that all ranks sample the same tokens
        model = build_transformer(ckpt, args, device, dtype, rank, world, quantize)  # int8/int4: quantized as it loads
        # The fast paths, applied from outside the model: each swaps some of its layers for others that compute the
        # same product, or runs its forward for the one-token steps of decoding. model.py's forward stays the math.
        model = choose_cpu_matmul(model)  # bfloat16 on a CPU: the faster of two matrix-product paths, measured
        decode_step = model
        if compile and device.type == "cuda":
            decode_step = cuda_graph_decode(model)
        elif compile:
            decode_step = compile_decode(model)
        return Llama(model, tokenizer, seed=seed, decode_step=decode_step)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        seed: int = 1,
        decode_step: Optional[Callable[..., torch.Tensor]] = None,
    ):
        self.model = model
        # The decoding loop's one-token step, called as model(tokens, start_pos): the model, or a faster path to its
        # forward (llama/fast.py). Prompts always go through the model itself.
        self.decode_step = decode_step if decode_step is not None else model
        self.tokenizer = tokenizer
        # Llama 4 with a vision encoder: its vision_args say how images become tokens, where the tokenizer has them.
        vision_args = getattr(model.params, "vision_args", None)
        if "<|patch|>" not in getattr(tokenizer, "special_tokens", {}):
            vision_args = None  # a tokenizer without image tokens: text chat only
        self.formatter = ChatFormat(tokenizer, vision_args=vision_args)
        # Token ids that end a generated sequence (not output themselves); the tokenizer's by default.
        self.stop_tokens: list[int] = list(tokenizer.stop_tokens)
        self.device = model.tok_embeddings.weight.device
        # Sampling draws from this object's own generator: the same seed gives the same samples on a fresh
        # object whatever else used torch's global RNG, and every model-parallel rank draws the same tokens.
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._run_id = 0  # which generation owns the KV cache; a paused stream checks it when resumed

    # -- The entry points: check the arguments, run the decoding loop, shape its outputs ---------------------------

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: Optional[int],
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt by up to max_gen_len tokens (None: to the end of the context); returns (tokens,
        logprobs or None).

        A sequence ends at its first stop token (not included), at max_gen_len, or at max_seq_len.
        logprobs: the log-probability of each returned token; echo: return the prompt tokens too (a prompt of
        max_seq_len tokens is then accepted, to be scored with logprobs).
        """
        prompts, max_gen_len = self._prepare("prompt_tokens", prompt_tokens, max_gen_len, temperature, top_p, echo=echo)
        outputs = _drain(self._generate(prompts, max_gen_len, temperature, top_p, logprobs, echo))
        return [out.tokens for out in outputs], ([out.logprobs for out in outputs] if logprobs else None)

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
        prompts, max_gen_len = self._prepare("prompt_tokens", prompt_tokens, max_gen_len, temperature, top_p)
        return self._generate(prompts, max_gen_len, temperature, top_p)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; max_gen_len None means to the end of the context (max_seq_len)."""
        prompt_tokens, max_gen_len = self._prepare("prompts", prompts, max_gen_len, temperature, top_p, echo=echo)
        outputs = _drain(self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo))
        results: list[CompletionPrediction] = []
        for out in outputs:
            result: CompletionPrediction = {"generation": self.tokenizer.decode(out.tokens)}
            if logprobs:
                result.update(tokens=self._pieces(out.tokens), logprobs=out.logprobs)
            results.append(result)
        return results

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
        prompts, max_gen_len = self._prepare("dialogs", dialogs, max_gen_len, temperature, top_p, tool_prompt_format)
        # Dialogs refused for their special tags (None) get Meta's answer and cost no compute.
        accepted = [p for p in prompts if p is not None]
        # A prompt's images go to the model with the first call, which feeds the prompts' common length only: so
        # that it holds all of them, dialogs with images are generated one at a time.
        batches = [[p] for p in accepted] if any(p.images for p in accepted) else [accepted] if accepted else []
        generated: list[Output] = []
        for batch in batches:
            tokens, images = [p.tokens for p in batch], [p.images for p in batch]
            generated += _drain(self._generate(tokens, max_gen_len, temperature, top_p, logprobs, images=images))
        outputs = iter(generated)
        results: list[ChatPrediction] = []
        for prompt in prompts:
            if prompt is None:
                out, message = Output([], [], None), _refusal()
            else:
                out = next(outputs)
                message = self._reply(out)
            result: ChatPrediction = {"generation": message}
            if logprobs:
                result.update(tokens=self._pieces(out.tokens), logprobs=out.logprobs)
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
        prompts, max_gen_len = self._prepare("prompt", prompt, max_gen_len, temperature, top_p)
        return decode_stream(self.tokenizer, _tokens(self._generate(prompts, max_gen_len, temperature, top_p), []))

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
        (prompt,), max_gen_len = self._prepare("dialog", dialog, max_gen_len, temperature, top_p, tool_prompt_format)
        if prompt is None:
            return ChatStream(iter([UNSAFE_ERROR]), _refusal)
        outputs: list[Output] = []
        steps = self._generate([prompt.tokens], max_gen_len, temperature, top_p, images=[prompt.images])
        tokens = _tokens(steps, outputs)
        return ChatStream(decode_stream(self.tokenizer, tokens), lambda: self._reply(outputs[0]))

    def _reply(self, out: Output) -> Message:
        """A generated reply as an assistant message: its tool calls (content "") when it holds some, else its
        text as generated, as Meta's chat_completion gives it (llama-models' parser also strips end spaces)."""
        stop_reason = self.formatter.stop_reason(out.stop_token)
        message = self.formatter.decode_assistant_message(out.tokens, stop_reason)
        if message.get("tool_calls"):
            return message
        return {"role": "assistant", "content": self.tokenizer.decode(out.tokens), "stop_reason": stop_reason}

    def _pieces(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in tokens]

    # -- The decoding loop of every entry point --------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool = False,
        echo: bool = False,
        images: Optional[list[list[torch.Tensor]]] = None,
    ) -> Generator[list[list[int]], None, list[Output]]:
        """Generate from checked prompts: yields, at each step that output tokens, the new tokens of every sequence
        ([] for one that gave none), and returns each sequence's Output once every sequence is done.

        A prefill feeds the prompts' common part; then each step feeds one token per sequence and writes the next:
        sampled, or the prompt's own where a prompt is that long. A sequence ends at its first generated stop
        token (not output), after max_gen_len tokens, or at max_seq_len.

        images: each prompt's image pixels (Llama 4), in the order of their <|patch|> tokens, which must all lie within
        the prompts' common length: the prefill feeds them to the model with the mask of those tokens.
        """
        self._run_id += 1
        run_id = self._run_id
        bsz, stop_tokens = len(prompt_tokens), set(self.stop_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(self.model.params.max_seq_len, max_prompt_len + max_gen_len)  # never past the KV cache
        tokens = torch.zeros((bsz, total_len), dtype=torch.long)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
        tokens = tokens.to(self.device)
        in_prompt = (torch.arange(total_len) < torch.tensor(prompt_lens)[:, None]).to(self.device)  # (bs, total_len)
        log_probs = torch.zeros((bsz, total_len), device=self.device) if logprobs else None
        # On the host: where each output ends (its first stop token, else max_gen_len or the context's end), the
        # stop token that ended it, and whether it is done (a prompt that fills the context has no room to generate).
        end_pos = [min(n + max_gen_len, total_len) for n in prompt_lens]
        stop_token: list[Optional[int]] = [None] * bsz
        done = [end == n for end, n in zip(end_pos, prompt_lens)]

        # Prefill. Only log-probabilities need every position's logits; sampling needs the last one.
        pixels = [image for prompt_images in images or [] for image in prompt_images]
        vision = {}
        if pixels:
            image_mask = tokens[:, :min_prompt_len] == self.tokenizer.special_tokens["<|patch|>"]
            assert int(image_mask.sum()) == sum(p.shape[0] for p in pixels) * self.formatter.patches_per_chunk
            vision = {"images": [p.to(self.device) for p in pixels], "image_mask": image_mask}
        logits = self.model(tokens[:, :min_prompt_len], 0, last_only=not logprobs, **vision)
        if logprobs:
            log_probs[:, 1:min_prompt_len] = token_logprobs(logits[:, :-1], tokens[:, 1:min_prompt_len])
        for cur_pos in range(min_prompt_len, total_len):
            if run_id != self._run_id:
                raise RuntimeError(
                    "another generation ran on this Llama object while this stream was paused, and reused its KV "
                    "cache: finish (or drop) one stream before starting the next call"
                )
            if cur_pos > min_prompt_len:  # one token per sequence: the one written at the last step
                logits = self.decode_step(tokens[:, cur_pos - 1 : cur_pos], cur_pos - 1)
            next_token = sample(logits[:, -1], temperature, top_p, self.generator)
            next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                log_probs[:, cur_pos] = token_logprobs(logits[:, -1:], next_token[:, None])[:, 0]
            new: list[list[int]] = [[] for _ in range(bsz)]
            for i, token in enumerate(next_token.tolist()):  # the one host sync per step
                if done[i] or cur_pos < prompt_lens[i]:
                    continue
                if token in stop_tokens:  # stop tokens count only where they were generated, never in a prompt
                    end_pos[i], stop_token[i], done[i] = cur_pos, token, True
                else:
                    new[i].append(token)
                    done[i] = cur_pos + 1 == end_pos[i]
            if any(new):
                yield new
            # With echo and logprobs the prompts' own log-probabilities are returned, so run at least until the
            # longest prompt has been through the model, even if every sequence is done before.
            if all(done) and not (logprobs and echo and cur_pos < max_prompt_len - 1):
                break

        # One copy to the host for the whole batch, then plain list slicing.
        all_tokens = tokens.tolist()
        all_logprobs = log_probs.tolist() if logprobs else None
        outputs = []
        for i, n in enumerate(prompt_lens):
            start, end = 0 if echo else n, end_pos[i]
            out_logprobs = all_logprobs[i][start:end] if all_logprobs is not None else None
            outputs.append(Output(all_tokens[i][start:end], out_logprobs, stop_token[i]))
        return outputs

    # -- Input checks: every user mistake is a ValueError naming the argument, before the KV cache is touched ------

    def _prepare(
        self,
        name: str,
        prompts: object,
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        tool_prompt_format: str = "json",
        echo: bool = False,
    ) -> tuple[list[Union[list[int], LLMInput, None]], int]:
        """Check a call's arguments and turn its prompts into token ids. name: the argument holding the prompts:
        a list of "prompt_tokens" (token ids), "prompts" (texts) or "dialogs" (message lists), or one "prompt" or
        "dialog". Returns each prompt's tokens (a dialog's with the pixels of its images, as an LLMInput; None for
        a Llama 2 dialog refused for its special tags) and max_gen_len, None meaning up to max_seq_len - 1 (the loop
        stops at the end of the context). A prompt must leave room to generate, except with echo (then it is
        returned, with its log-probabilities if asked)."""
        max_batch_size, max_seq_len = self.model.params.max_batch_size, self.model.params.max_seq_len
        if name in ("prompt", "dialog"):
            named = [(name, prompts)]
        else:
            if isinstance(prompts, (str, bytes, Mapping)) or not isinstance(prompts, Sequence):
                raise ValueError(f"{name} must be {BATCHES[name]}")
            if len(prompts) == 0:
                raise ValueError(f"{name} is empty: pass at least one")
            if len(prompts) > max_batch_size:
                raise ValueError(
                    f"{len(prompts)} {name} but max_batch_size is {max_batch_size}: pass at most {max_batch_size} at "
                    "a time, or build the Llama with a larger max_batch_size"
                )
            named = [(f"{name}[{i}]", prompt) for i, prompt in enumerate(prompts)]
        if name == "prompt_tokens":
            tokens = [self._check_prompt(prompt, n, echo) for n, prompt in named]
        elif name.startswith("prompt"):
            tokens = [self._encode_text(prompt, n, echo) for n, prompt in named]
        else:
            tokens = [self._encode_dialog(dialog, n, tool_prompt_format) for n, dialog in named]

        if max_gen_len is None:
            max_gen_len = max_seq_len - 1
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, numbers.Integral) or max_gen_len < 1:
            raise ValueError(
                f"max_gen_len must be a positive integer (number of tokens to generate), got {max_gen_len!r}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a number >= 0 (0 for greedy decoding), got {temperature!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 for greedy decoding), got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 samples from every token), got {top_p!r}")
        return tokens, int(max_gen_len)

    def _check_prompt(self, prompt: list[int], name: str, echo: bool = False) -> list[int]:
        vocab_size, max_seq_len = self.model.params.vocab_size, self.model.params.max_seq_len
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise ValueError(f"{name} must be a list of token ids (ints), got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"{name} is empty: a prompt needs at least one token (e.g. the BOS token)")
        if len(prompt) > max_seq_len or (len(prompt) == max_seq_len and not echo):
            raise ValueError(
                f"{name} is {len(prompt)} tokens long but max_seq_len is {max_seq_len}, which leaves no room to "
                "generate (max_seq_len must exceed a prompt's length): shorten it, or build the Llama with a larger "
                "max_seq_len"
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

    def _encode_text(self, prompt: str, name: str, echo: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"{name} is empty: give some text to complete")
        return self._check_prompt(self.tokenizer.encode(prompt, bos=True, eos=False), name, echo)

    def _encode_dialog(self, dialog: Dialog, name: str, tool_prompt_format: str) -> Optional[LLMInput]:
        """The prompt of a dialog (tokens, and pixels of its images), or None for a Llama 2 dialog refused for its
        special tags."""
        if isinstance(dialog, (str, Mapping)) or not isinstance(dialog, Sequence):
            raise ValueError(f"{name} must be a list of messages, each {{'role': ..., 'content': ...}}")
        if len(dialog) == 0:
            raise ValueError(f"{name} is empty: it needs at least one user message")
        for j, message in enumerate(dialog):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"{name}[{j}] must be a dict with a 'role' string and a 'content' string")
            content = message.get("content")
            if isinstance(content, (bytes, Mapping)) or not isinstance(content, (str, Sequence)):
                raise ValueError(
                    f"{name}[{j}]['content'] must be a string or a list of {{'type': 'text' or 'image', ...}} items, "
                    f"got {type(content).__name__}"
                )
        if dialog[-1]["role"] not in ("user", "ipython", "tool"):
            raise ValueError(
                f"{name} is malformed: its last message is from {dialog[-1]['role']!r}; for the assistant to answer, "
                "it must be from the user (or 'ipython', a tool's result); to score or continue an assistant message, use "
                "ChatFormat.encode_dialog_prompt and generate"
            )
        try:
            prompt = self.formatter.encode_dialog(dialog, tool_prompt_format)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{name} is malformed: {e}") from None
        if isinstance(self.formatter, Llama2ChatFormat) and has_special_tags(dialog):
            return None  # refused, whatever its length; Llama 3's format takes the tags as plain text
        max_seq_len = self.model.params.max_seq_len
        if prompt.images and len(prompt.tokens) > max_seq_len:
            image_tokens = sum(t in self.formatter.image_tokens for t in prompt.tokens)
            raise ValueError(
                f"{name} is {len(prompt.tokens)} tokens long, {image_tokens} of them for its {len(prompt.images)} "
                f"image(s), but max_seq_len is {max_seq_len}: give fewer or smaller images, or build "
                "the Llama with a larger max_seq_len"
            )
        return LLMInput(self._check_prompt(prompt.tokens, name), prompt.images)


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


def _drain(steps: Generator[list[list[int]], None, list[Output]]) -> list[Output]:
    """Run a generation to its end; returns what its loop returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _tokens(steps: Generator[list[list[int]], None, list[Output]], outputs: list[Output]) -> Iterator[int]:
    """The tokens of a one-prompt generation as its steps give them; once they run out, outputs holds what the
    loop returned."""
    while True:
        try:
            [new] = next(steps)
        except StopIteration as end:
            outputs.extend(end.value)
            return
        yield from new
