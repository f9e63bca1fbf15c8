"""ChatFormat: a dialog to prompt tokens, and a reply's tokens back to a message, exactly as Meta's chat code
does for each model family: Llama 4's headers (<|header_start|>role<|header_end|>) and Llama 3's
(<|start_header_id|>role<|end_header_id|>), both with tool calls, or Llama 2's [INST] ... [/INST] turns."""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from llama.tool_utils import (
    ToolCall,
    ToolPromptFormat,
    check_tool_call,
    check_tool_prompt_format,
    encode_tool_calls,
    parse_tool_calls,
)

if TYPE_CHECKING:  # llama.tokenizer re-exports ChatFormat, so it is imported only for type checking here
    from llama.tokenizer import Tokenizer

# "ipython" is the role of a tool's result; "tool" (llama-models' name for it) is taken as a synonym.
Role = Literal["system", "user", "assistant", "ipython", "tool"]
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


class _Message(TypedDict):
    role: Role
    content: str


class Message(_Message, total=False):
    tool_calls: list[ToolCall]  # assistant messages: the tools it called
    stop_reason: StopReason  # assistant messages: "end_of_message" when it waits for a tool's result


Dialog = Sequence[Message]
# -- Chat formats ---------------------------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Llama 2 chat wraps turns in these tags; a dialog that writes them itself could forge turns.
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]

LLAMA3_ROLES = ("system", "user", "assistant", "ipython", "tool")
LLAMA2_ROLES = ("system", "user", "assistant")


def has_special_tags(dialog: Dialog) -> bool:
    """Whether a message of `dialog` holds one of Llama 2's chat tags ([INST], [/INST], <<SYS>>, <</SYS>>);
    Meta's Llama 2 answers such a dialog with "Error: special tags are not allowed as part of the prompt."."""
    return any(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) and tag in m["content"]
        for m in dialog
        for tag in SPECIAL_TAGS
    )


# Each family's header and end tokens, and the tag before code for the interpreter.
STYLE_TOKENS = {
    "llama3": {
        "header": ("<|start_header_id|>", "<|end_header_id|>"),
        "eot": "<|eot_id|>",
        "eom": "<|eom_id|>",
        "python": "<|python_tag|>",
    },
    "llama4": {
        "header": ("<|header_start|>", "<|header_end|>"),
        "eot": "<|eot|>",
        "eom": "<|eom|>",
        "python": "<|python_start|>",
    },
}


class ChatFormat:
    """Dialogs to prompt tokens in the format the tokenizer's models were tuned on, and replies back to
    messages: Llama 4's headers, Llama 3's headers, or Llama 2's [INST] ... [/INST] turns.

    Llama 3 strips each message's content, as Meta's llama3 repository does; Llama 4 keeps it as given, as
    llama-models (Llama 4's only reference) does. Tool calls are written as llama-models writes them."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        # Duck-typed, so that Meta's own tokenizers work here too: Llama 2's has no special tokens.
        special = getattr(tokenizer, "special_tokens", None)
        self.style: Literal["llama4", "llama3", "llama2"] = (
            "llama2" if special is None else "llama4" if "<|header_start|>" in special else "llama3"
        )
        if self.style != "llama2":
            names = STYLE_TOKENS[self.style]
            self.eot_id, self.eom_id = special[names["eot"]], special[names["eom"]]
            self.python_id = special[names["python"]]
            self.python_end_id = special.get("<|python_end|>")  # Llama 4's
            # The stop tokens that end a reply, and what each says.
            self.stop_reasons: dict[int, StopReason] = {
                special["<|end_of_text|>"]: "end_of_turn",
                self.eom_id: "end_of_message",
                self.eot_id: "end_of_turn",
            }

    def encode_header(self, message: Message) -> list[int]:
        """Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\n (Llama 4: <|header_start|>role<|header_end|>).
        Llama 2 turns have no header."""
        if self.style == "llama2":
            raise ValueError("Llama 2's chat format has no message headers: use encode_dialog_prompt")
        return self._header(_checked_message(message, LLAMA3_ROLES, "the message")["role"])

    def encode_message(self, message: Message, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """Llama 3 and 4: the header, the content, the message's tool calls, and <|eot_id|> (or <|eom_id|>
        when it waits for a tool's result). Llama 2: a user message as a prompt of its own,
        `<s>[INST] content [/INST]` (an answer is encoded together with its question).

        tool_prompt_format: how calls to functions (not built-in tools) are written: "json",
        "function_tag" (<function=name>{...}</function>) or "python_list" ([name(a=1)])."""
        tool_prompt_format = check_tool_prompt_format(tool_prompt_format)
        if self.style == "llama2":
            message = _checked_message(message, LLAMA2_ROLES, "the message")
            if message["role"] != "user":
                raise ValueError(
                    f"Llama 2's chat format encodes a {message['role']} message only within a dialog: "
                    "use encode_dialog_prompt"
                )
            return self.tokenizer.encode(f"{B_INST} {message['content'].strip()} {E_INST}", bos=True, eos=False)
        return self._message(_checked_message(message, LLAMA3_ROLES, "the message"), tool_prompt_format)

    def encode_dialog_prompt(self, dialog: Dialog, tool_prompt_format: ToolPromptFormat = "json") -> list[int]:
        """The prompt tokens of a dialog, then the header of the assistant's reply. Llama 3 and 4 format any
        dialog, as Meta's does (one ending with an assistant message scores or prefills a reply);
        Llama 2's needs the user's message last."""
        tool_prompt_format = check_tool_prompt_format(tool_prompt_format)
        if self.style == "llama2":
            return self._llama2_dialog(dialog)
        messages = _checked_dialog(dialog, LLAMA3_ROLES)
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in messages:
            tokens.extend(self._message(message, tool_prompt_format))
        # The start of an assistant message, for the model to complete.
        tokens.extend(self._header("assistant"))
        return tokens

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        """A reply's tokens as an assistant message {"role", "content", "stop_reason", "tool_calls"}, parsed
        as llama-models parses it, and right where it is not (every call of a python list; a JSON call
        without "parameters"; apostrophes in <function=...> arguments). Never raises on a model's output:
        text that does not parse as a call is content. A trailing stop token sets the stop reason."""
        stop_reason = _checked_stop_reason(stop_reason)
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if self.style == "llama2":
            if ids and ids[-1] == self.tokenizer.eos_id:
                ids, stop_reason = ids[:-1], "end_of_turn"
            return {"role": "assistant", "content": self.tokenizer.decode(ids), "stop_reason": stop_reason}
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
        """What the token that ended a generation says: None (no stop token) is "out_of_tokens"."""
        if stop_token is None:
            return "out_of_tokens"
        if self.style == "llama2":
            return "end_of_turn"
        return self.stop_reasons.get(stop_token, "end_of_turn")

    def _header(self, role: str) -> list[int]:
        start, end = STYLE_TOKENS[self.style]["header"]
        tokens = [self.tokenizer.special_tokens[start]]
        tokens.extend(self.tokenizer.encode("ipython" if role == "tool" else role, bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens[end])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def _message(self, message: Message, tool_prompt_format: ToolPromptFormat) -> list[int]:
        role, calls = message["role"], message["tool_calls"]
        tokens = self._header(role)
        if self.style == "llama3" and calls and calls[0]["tool_name"] == "code_interpreter":
            tokens.append(self.python_id)  # Llama 3 writes code for the interpreter after <|python_tag|>
        content = message["content"].strip() if self.style == "llama3" else message["content"]
        tokens.extend(self.tokenizer.encode(content, bos=False, eos=False))
        for text, code in encode_tool_calls(calls, tool_prompt_format):
            # Llama 4 code sits between <|python_start|> and <|python_end|>, where llama-models' parser looks for
            # it (its encoder writes the code bare, which its parser then takes for plain text).
            llama4_code = code and self.style == "llama4"
            tokens.extend([self.python_id] if llama4_code else [])
            tokens.extend(self.tokenizer.encode(text, bos=False, eos=False))
            tokens.extend([self.python_end_id] if llama4_code else [])
        if role == "assistant":
            # Llama 4 ends every call with <|eom|>; Llama 3 only a reply whose stop reason says so.
            eom = message["stop_reason"] == "end_of_message" or (self.style == "llama4" and bool(calls))
        else:
            eom = self.style == "llama4" and role in ("ipython", "tool")  # Llama 4 ends a tool's result so
        tokens.append(self.eom_id if eom else self.eot_id)
        return tokens

    def _llama2_dialog(self, dialog: Dialog) -> list[int]:
        """Meta's Llama 2 chat_completion: the system prompt folded into the first user message, each
        (user, answer) exchange as `<s>[INST] user [/INST] answer </s>`, then `<s>[INST] user [/INST]`."""
        messages = [{"role": m["role"], "content": m["content"]} for m in _checked_dialog(dialog, LLAMA2_ROLES)]
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
        return tokens


def _checked_dialog(dialog: Dialog, roles: Sequence[str]) -> list[Message]:
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(
            f"a dialog must be a list of messages, each {{'role': ..., 'content': ...}}, got {type(dialog).__name__}"
        )
    if len(dialog) == 0:
        raise ValueError("the dialog is empty: it needs at least one user message")
    return [_checked_message(message, roles, f"message {i}") for i, message in enumerate(dialog)]


def _checked_message(message: Any, roles: Sequence[str], name: str) -> Message:
    """The message with its tool calls checked (and [] when it has none), or a ValueError saying what is wrong."""
    if not isinstance(message, Mapping):
        raise ValueError(f"{name} is a {type(message).__name__}, not a dict {{'role': ..., 'content': ...}}")
    role, content = message.get("role"), message.get("content")
    if role not in roles:
        raise ValueError(f"{name} has role {role!r}: the roles of this chat format are {', '.join(roles)}")
    if not isinstance(content, str):
        raise ValueError(f"{name} has content of type {type(content).__name__}: content must be a str")
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
