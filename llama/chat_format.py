"""Dialogs to prompt tokens and replies back to messages, one class per family: Llama 4's headers
(<|header_start|>role<|header_end|>, with images) and Llama 3's (<|start_header_id|>role<|end_header_id|>), both
with tool calls, or Llama 2's [INST] ... [/INST] turns. `ChatFormat(tokenizer)` gives the tokenizer's."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict, Union

import torch

from llama.preprocess import MAX_NUM_CHUNKS, ImageInput, transform_image
from llama.tool_utils import (
    ToolCall,
    ToolPromptFormat,
    check_tool_call,
    check_tool_prompt_format,
    encode_tool_calls,
    parse_tool_calls,
)

# "ipython" is the role of a tool's result; "tool" (llama-models' name for it) is taken as a synonym.
Role = Literal["system", "user", "assistant", "ipython", "tool"]
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


class TextItem(TypedDict):
    type: Literal["text"]
    text: str


class ImageItem(TypedDict):
    type: Literal["image"]
    image: ImageInput  # a path, the bytes of an image file, or a PIL image


Content = Union[str, Sequence[Union[TextItem, ImageItem]]]


class _Message(TypedDict):
    role: Role
    content: Content


class Message(_Message, total=False):
    tool_calls: list[ToolCall]  # assistant messages: the tools it called
    stop_reason: StopReason  # assistant messages: "end_of_message" when it waits for a tool's result


Dialog = Sequence[Message]


class TokenizerLike(Protocol):
    """What a chat format uses of a tokenizer (this library's, or Meta's own); Llama 3 and 4 also special_tokens."""

    eos_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, t: Sequence[int]) -> str: ...


@dataclass
class LLMInput:
    """A prompt as the model takes it: tokens, and the pixels of its images in the order of their <|patch|> runs."""

    tokens: list[int]
    images: list[torch.Tensor] = field(default_factory=list)  # each (n_chunks, 3, S, S)


class ChatFormat:
    """Dialogs to prompt tokens in the format the tokenizer's models were tuned on, and replies back to
    messages. ChatFormat(tokenizer) gives the family's format: Llama4ChatFormat, Llama3ChatFormat or
    Llama2ChatFormat. vision_args (Llama 4, a model's params.vision_args): how images become tokens."""

    style: Literal["llama4", "llama3", "llama2"]  # the family

    def __new__(cls, tokenizer: TokenizerLike, *args, **kwargs):
        if cls is ChatFormat:
            cls = _format_class(tokenizer)
        return super().__new__(cls)

    def __init__(self, tokenizer: TokenizerLike, vision_args: Any = None, max_num_chunks: int = MAX_NUM_CHUNKS):
        self.tokenizer = tokenizer
        if vision_args is not None:
            raise ValueError(f"{type(self).__name__} takes no images, so no vision_args: images need Llama 4")

    def encode_header(self, message: Message) -> list[int]:
        raise NotImplementedError

    def encode_message(self, message: Message, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        raise NotImplementedError

    def encode_dialog(self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json") -> LLMInput:
        """The prompt of a dialog with the pixels of its images (Llama 4), as llama-models' encode_dialog_prompt
        gives it."""
        raise NotImplementedError

    def encode_dialog_prompt(self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """The prompt tokens of a dialog, then the header of the assistant's reply (Llama 3 and 4, which format
        any dialog, as Meta's do; one ending with an assistant message scores or prefills a reply). Llama 2's
        needs the user's message last."""
        return self.encode_dialog(dialog, tool_prompt_format).tokens

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        raise NotImplementedError

    def stop_reason(self, stop_token: "int | None") -> StopReason:
        """What the token that ended a generation says: None (no stop token) is "out_of_tokens"."""
        return "out_of_tokens" if stop_token is None else "end_of_turn"


def _format_class(tokenizer: TokenizerLike) -> type:
    # Duck-typed, so that Meta's own tokenizers work here too: Llama 2's has no special tokens.
    special = getattr(tokenizer, "special_tokens", None)
    if special is None:
        return Llama2ChatFormat
    return Llama4ChatFormat if "<|header_start|>" in special else Llama3ChatFormat


# -- Llama 3 ----------------------------------------------------------------------------------------------------


class Llama3ChatFormat(ChatFormat):
    """Llama 3.x: <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>; content stripped, as Meta's
    llama3 repository strips it; tool calls written as llama-models writes them."""

    style = "llama3"
    roles = ("system", "user", "assistant", "ipython", "tool")
    header_start, header_end = "<|start_header_id|>", "<|end_header_id|>"
    eot, eom, python_start, python_end = "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", None

    def __init__(self, tokenizer: TokenizerLike, vision_args: Any = None, max_num_chunks: int = MAX_NUM_CHUNKS):
        super().__init__(tokenizer, vision_args, max_num_chunks)
        special = tokenizer.special_tokens
        self.eot_id, self.eom_id, self.python_id = special[self.eot], special[self.eom], special[self.python_start]
        self.python_end_id = special[self.python_end] if self.python_end else None
        # The stop tokens that end a reply, and what each says.
        self.stop_reasons: dict[int, StopReason] = {
            special["<|end_of_text|>"]: "end_of_turn",
            self.eom_id: "end_of_message",
            self.eot_id: "end_of_turn",
        }

    def encode_header(self, message: Message) -> list[int]:
        """<|start_header_id|>role<|end_header_id|>\\n\\n (Llama 4: <|header_start|>role<|header_end|>\\n\\n)."""
        return self._header(_checked_message(message, self.roles, "the message")["role"])

    def encode_message(self, message: Message, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """The header, the content, the message's tool calls, and the end of turn (or of message, when it waits
        for a tool's result). tool_prompt_format: how calls to functions (not built-in tools) are written:
        "json", "function_tag" (<function=name>{...}</function>) or "python_list" ([name(a=1)])."""
        tool_prompt_format = check_tool_prompt_format(tool_prompt_format)
        return self._message(_checked_message(message, self.roles, "the message"), tool_prompt_format, [])

    def encode_dialog(self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json") -> LLMInput:
        tool_prompt_format = check_tool_prompt_format(tool_prompt_format)
        prompt = LLMInput([self.tokenizer.special_tokens["<|begin_of_text|>"]])
        for message in _checked_dialog(dialog, self.roles):
            prompt.tokens.extend(self._message(message, tool_prompt_format, prompt.images))
        prompt.tokens.extend(self._header("assistant"))  # the start of the reply, for the model to complete
        return prompt

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        """A reply's tokens as an assistant message {"role", "content", "stop_reason", "tool_calls"}, parsed
        as llama-models parses it, and right where it is not (every call of a python list; a JSON call
        without "parameters"; apostrophes in <function=...> arguments). Never raises on a model's output:
        text that does not parse as a call is content. A trailing stop token sets the stop reason."""
        stop_reason = _checked_stop_reason(stop_reason)
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        header = self._header("assistant")
        has_header = ids[: len(header)] == header
        if has_header:
            ids = ids[len(header) :]
        stopped = bool(ids) and ids[-1] in (self.eot_id, self.eom_id, self.tokenizer.eos_id)
        if stopped:
            stop_reason = self.stop_reasons[ids.pop()]
        python_tag = bool(ids) and ids[0] == self.python_id
        if python_tag:
            ids = [t for t in ids[1:] if t != self.python_end_id]
        content = self.tokenizer.decode(ids)
        # llama-models strips spaces from the ends of the reply's text, where no special token stands.
        if not (has_header or python_tag):
            content = content.lstrip(" ")
        if not stopped:
            content = content.rstrip(" ")
        tool_calls = parse_tool_calls(content, python_tag)
        return {
            "role": "assistant",
            "content": "" if tool_calls else content,
            "stop_reason": stop_reason,
            "tool_calls": tool_calls,
        }

    def stop_reason(self, stop_token: "int | None") -> StopReason:
        return "out_of_tokens" if stop_token is None else self.stop_reasons.get(stop_token, "end_of_turn")

    def _header(self, role: str) -> list[int]:
        tokens = [self.tokenizer.special_tokens[self.header_start]]
        tokens.extend(self.tokenizer.encode("ipython" if role == "tool" else role, bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens[self.header_end])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def _message(self, message: Message, tool_prompt_format: ToolPromptFormat, images: list) -> list[int]:
        """The message's tokens; the pixels of its images are appended to `images`."""
        tokens = self._header(message["role"])
        tokens.extend(self._content(message, images))
        for text, code in encode_tool_calls(message["tool_calls"], tool_prompt_format):
            tokens.extend(self._tool_call(text, code))
        tokens.append(self.eom_id if self._waits_for_tool(message) else self.eot_id)
        return tokens

    def _content(self, message: Message, images: list) -> list[int]:
        calls = message["tool_calls"]
        # Llama 3 writes code for the interpreter after <|python_tag|>, before the content.
        tag = [self.python_id] if calls and calls[0]["tool_name"] == "code_interpreter" else []
        text = _text_only(message["content"], f"a {message['role']} message", "Llama 3")
        return tag + self.tokenizer.encode(text.strip(), bos=False, eos=False)

    def _tool_call(self, text: str, code: bool) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _waits_for_tool(self, message: Message) -> bool:
        return message["role"] == "assistant" and message["stop_reason"] == "end_of_message"


# -- Llama 4 ----------------------------------------------------------------------------------------------------


# The special tokens an image is written with.
IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>")
IMAGE_TOKENS += ("<|tile_x_separator|>", "<|tile_y_separator|>")


class Llama4ChatFormat(Llama3ChatFormat):
    """Llama 4: <|header_start|>role<|header_end|>\\n\\n content <|eot|>, content kept as given (llama-models,
    Llama 4's only reference, does not strip it), and images: each item of a message's content list is encoded
    on its own, an image as <|image_start|>, its tiles' <|patch|> runs, <|image|>, the thumbnail's, <|image_end|>.

    vision_args (the model's params.vision_args: image_size, patch_size, pixel_shuffle_ratio) is needed for images
    only; max_num_chunks: the most tiles an image is cut into."""

    style = "llama4"
    header_start, header_end = "<|header_start|>", "<|header_end|>"
    eot, eom, python_start, python_end = "<|eot|>", "<|eom|>", "<|python_start|>", "<|python_end|>"

    def __init__(self, tokenizer: TokenizerLike, vision_args: Any = None, max_num_chunks: int = MAX_NUM_CHUNKS):
        super().__init__(tokenizer, None, max_num_chunks)
        self.vision_args, self.max_num_chunks = vision_args, max_num_chunks
        if vision_args is not None:
            tile, patch = vision_args.image_size, vision_args.patch_size
            if tile.height != tile.width or tile.height % patch.height or tile.width % patch.width:
                raise ValueError(
                    f"vision_args has image_size {tile} and patch_size {patch}: tiles are square and a whole "
                    "number of patches on each side"
                )
            # pixel_shuffle_ratio 0.5 merges each 2 x 2 block of patches into one token.
            merged = round(1 / vision_args.pixel_shuffle_ratio**2)
            self.patches_per_chunk = (tile.height // patch.height) * (tile.width // patch.width) // merged
        self.image_tokens = {tokenizer.special_tokens[t] for t in IMAGE_TOKENS}

    def _content(self, message: Message, images: list) -> list[int]:
        content = message["content"]
        if isinstance(content, str):
            return self.tokenizer.encode(content, bos=False, eos=False)
        tokens = []
        for item in content:
            if item["type"] == "text":
                tokens.extend(self.tokenizer.encode(item["text"], bos=False, eos=False))
            else:
                tokens.extend(self._image(item["image"], images))
        return tokens

    def _image(self, image: ImageInput, images: list) -> list[int]:
        if self.vision_args is None:
            raise ValueError(
                "a message holds an image, but this Llama 4 model has no vision encoder (its params have no "
                "vision_args, or it was built text-only): build it from a multimodal checkpoint"
            )
        transformed = transform_image(image, self.vision_args.image_size.width, self.max_num_chunks)
        images.append(transformed.pixels)
        special = self.tokenizer.special_tokens
        patches = [special["<|patch|>"]] * self.patches_per_chunk
        tokens = [special["<|image_start|>"]]
        rows, cols = transformed.aspect_ratio
        if rows * cols > 1:  # the tiles row by row, then the thumbnail after <|image|>
            for _ in range(rows):
                for col in range(cols):
                    tokens += patches + ([special["<|tile_x_separator|>"]] if col < cols - 1 else [])
                tokens.append(special["<|tile_y_separator|>"])
        return tokens + [special["<|image|>"], *patches, special["<|image_end|>"]]

    def _tool_call(self, text: str, code: bool) -> list[int]:
        # Code sits between <|python_start|> and <|python_end|>, where llama-models' parser looks for it (its
        # encoder writes the code bare, which its parser then takes for plain text).
        tokens = self.tokenizer.encode(text, bos=False, eos=False)
        return [self.python_id, *tokens, self.python_end_id] if code else tokens

    def _waits_for_tool(self, message: Message) -> bool:
        # Llama 4 ends every call, and a tool's result, with <|eom|>.
        return super()._waits_for_tool(message) or bool(message["tool_calls"]) or message["role"] in ("ipython", "tool")


# -- Llama 2 ----------------------------------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Llama 2 chat wraps turns in these tags; a dialog that writes them itself could forge turns.
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def has_special_tags(dialog: Dialog) -> bool:
    """Whether a message of `dialog` holds one of Llama 2's chat tags ([INST], [/INST], <<SYS>>, <</SYS>>);
    Meta's Llama 2 answers such a dialog with "Error: special tags are not allowed as part of the prompt."."""
    texts = [_text_of(m.get("content")) for m in dialog if isinstance(m, Mapping)]
    return any(tag in text for text in texts for tag in SPECIAL_TAGS)


class Llama2ChatFormat(ChatFormat):
    """Llama 2 chat, as Meta's Llama 2 chat_completion builds it: the system prompt folded into the first user
    message, each (user, answer) exchange as `<s>[INST] user [/INST] answer </s>`, then `<s>[INST] user [/INST]`."""

    style = "llama2"
    roles = ("system", "user", "assistant")

    def encode_header(self, message: Message) -> list[int]:
        raise ValueError("Llama 2's chat format has no message headers: use encode_dialog_prompt")

    def encode_message(self, message: Message, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """A user message as a prompt of its own, `<s>[INST] content [/INST]` (an answer is encoded together with
        its question, by encode_dialog_prompt)."""
        check_tool_prompt_format(tool_prompt_format)
        message = _checked_message(message, self.roles, "the message")
        if message["role"] != "user":
            raise ValueError(
                f"Llama 2's chat format encodes a {message['role']} message only within a dialog: "
                "use encode_dialog_prompt"
            )
        return self.tokenizer.encode(f"{B_INST} {self._text(message).strip()} {E_INST}", bos=True, eos=False)

    def encode_dialog(self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json") -> LLMInput:
        check_tool_prompt_format(tool_prompt_format)
        messages = [{"role": m["role"], "content": self._text(m)} for m in _checked_dialog(dialog, self.roles)]
        if messages[0]["role"] == "system":
            if len(messages) == 1:
                raise ValueError("the dialog holds only a system message: add the user's message after it")
            system = messages.pop(0)["content"]
            messages[0]["content"] = B_SYS + system + E_SYS + messages[0]["content"]
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise ValueError(
                    f"Llama 2 chat takes an optional 'system' message, then 'user' and 'assistant' messages "
                    f"alternating (u/a/u/a/u...), but message {i + (len(messages) < len(dialog))} is from "
                    f"{m['role']!r} where {expected!r} was expected"
                )
        if messages[-1]["role"] != "user":
            raise ValueError(f"the last message must be from the user, got {messages[-1]['role']!r}")
        tokens: list[int] = []
        for prompt, answer in zip(messages[::2], messages[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                bos=True,
                eos=True,
            )
        tokens += self.tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return LLMInput(tokens)

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        """A reply's tokens as an assistant message {"role", "content", "stop_reason"}; a trailing EOS ends the turn."""
        stop_reason = _checked_stop_reason(stop_reason)
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids, stop_reason = ids[:-1], "end_of_turn"
        return {"role": "assistant", "content": self.tokenizer.decode(ids), "stop_reason": stop_reason}

    def _text(self, message: Message) -> str:
        return _text_only(message["content"], f"a {message['role']} message", "Llama 1 and 2")


# -- Checking messages ------------------------------------------------------------------------------------------

ITEMS = "{'type': 'text', 'text': str} or {'type': 'image', 'image': a path, bytes or a PIL image}"


def _text_of(content: Any) -> str:
    """The text of a message's content (its text items, joined), "" where it has none."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(i["text"] for i in content if isinstance(i, Mapping) and isinstance(i.get("text"), str))
    return ""


def _text_only(content: Content, name: str, models: str) -> str:
    """The text of a checked content for models that read text only: its text items, joined."""
    if not isinstance(content, str) and any(item["type"] == "image" for item in content):
        raise ValueError(f"{name} holds an image, but {models} models read text only: images need a Llama 4 model")
    return _text_of(content)


def _checked_dialog(dialog: Dialog, roles: Sequence[str]) -> list[Message]:
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(
            f"a dialog must be a list of messages, each {{'role': ..., 'content': ...}}, got {type(dialog).__name__}"
        )
    if len(dialog) == 0:
        raise ValueError("the dialog is empty: it needs at least one user message")
    return [_checked_message(message, roles, f"message {i}") for i, message in enumerate(dialog)]


def _checked_content(content: Any, name: str) -> Content:
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise ValueError(
            f"{name} has content of type {type(content).__name__}: content must be a str or a list of {ITEMS}"
        )
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, Mapping) else None
        if not (kind == "text" and isinstance(item.get("text"), str)) and not (kind == "image" and "image" in item):
            raise ValueError(f"{name}'s content item {j} is {item!r:.80}: each item is {ITEMS}")
    return list(content)


def _checked_message(message: Any, roles: Sequence[str], name: str) -> Message:
    """The message with its content and tool calls checked (tool_calls [] when it has none), or a ValueError
    saying what is wrong."""
    if not isinstance(message, Mapping):
        raise ValueError(f"{name} is a {type(message).__name__}, not a dict {{'role': ..., 'content': ...}}")
    role = message.get("role")
    if role not in roles:
        raise ValueError(f"{name} has role {role!r}: the roles of this chat format are {', '.join(roles)}")
    content = _checked_content(message.get("content"), name)
    calls = message.get("tool_calls") or []
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{name} has tool_calls of type {type(calls).__name__}: tool_calls is a list of calls")
    if calls and role != "assistant":
        raise ValueError(f"{name} is from {role!r} and has tool_calls: only assistant messages call tools")
    if calls and "ipython" not in roles:
        raise ValueError(f"{name} has tool_calls: Llama 2's chat format has no tool calls")
    stop_reason = message.get("stop_reason")
    return {
        "role": role,
        "content": content,
        "tool_calls": [check_tool_call(call, f"{name}'s tool call {j}") for j, call in enumerate(calls)],
        "stop_reason": None if stop_reason is None else _checked_stop_reason(stop_reason, f"{name}'s stop_reason"),
    }


def _checked_stop_reason(stop_reason: Any, name: str = "stop_reason") -> StopReason:
    value = getattr(stop_reason, "value", stop_reason)  # llama-models' StopReason enum too
    if value not in STOP_REASONS:
        raise ValueError(f"{name} is {stop_reason!r}: use one of {', '.join(map(repr, STOP_REASONS))}")
    return value
