"""ChatFormat: a dialog to prompt tokens, exactly as Meta's chat code builds them for each model family:
Llama 3's headers (<|start_header_id|>role<|end_header_id|>) or Llama 2's [INST] ... [/INST] turns."""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

if TYPE_CHECKING:  # llama.tokenizer re-exports ChatFormat, so it is imported only for type checking here
    from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

# -- Chat formats ---------------------------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Llama 2 chat wraps turns in these tags; a dialog that writes them itself could forge turns.
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]

LLAMA3_ROLES = ("system", "user", "assistant", "ipython")
LLAMA2_ROLES = ("system", "user", "assistant")


def has_special_tags(dialog: Dialog) -> bool:
    """Whether a message of `dialog` holds one of Llama 2's chat tags ([INST], [/INST], <<SYS>>, <</SYS>>);
    Meta's Llama 2 answers such a dialog with "Error: special tags are not allowed as part of the prompt."."""
    return any(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) and tag in m["content"]
        for m in dialog
        for tag in SPECIAL_TAGS
    )


class ChatFormat:
    """Dialogs to prompt tokens, in the format the tokenizer's models were tuned on: Llama 3's headers
    (<|start_header_id|>role<|end_header_id|>) or Llama 2's [INST] ... [/INST] turns."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        # Duck-typed, so that Meta's own Llama 3 tokenizer works here too: only Llama 3's has special tokens.
        self.style: Literal["llama3", "llama2"] = (
            "llama3" if hasattr(tokenizer, "special_tokens") else "llama2"
        )

    def encode_header(self, message: Message) -> list[int]:
        """Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\n. Llama 2 turns have no header."""
        if self.style == "llama2":
            raise ValueError("Llama 2's chat format has no message headers: use encode_dialog_prompt")
        _check_message(message, LLAMA3_ROLES, "the message")
        return self._header(message["role"])

    def encode_message(self, message: Message) -> list[int]:
        """Llama 3: the header, the stripped content, <|eot_id|>. Llama 2: a user message as a prompt of
        its own, `<s>[INST] content [/INST]` (an answer is encoded together with its question)."""
        if self.style == "llama2":
            _check_message(message, LLAMA2_ROLES, "the message")
            if message["role"] != "user":
                raise ValueError(
                    f"Llama 2's chat format encodes a {message['role']} message only within a dialog: "
                    "use encode_dialog_prompt"
                )
            return self.tokenizer.encode(
                f"{B_INST} {message['content'].strip()} {E_INST}", bos=True, eos=False
            )
        _check_message(message, LLAMA3_ROLES, "the message")
        return self._message(message)

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The prompt tokens of a dialog, ending where the assistant's reply begins."""
        if self.style == "llama2":
            return self._llama2_dialog(dialog)
        _check_dialog(dialog, LLAMA3_ROLES)
        if dialog[-1]["role"] not in ("user", "ipython"):
            raise ValueError(
                f"the last message is from {dialog[-1]['role']!r}: it must be from the user (or ipython, a tool's "
                "result), for the assistant to answer"
            )
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens.extend(self._message(message))
        # The start of an assistant message, for the model to complete.
        tokens.extend(self._header("assistant"))
        return tokens

    def _header(self, role: str) -> list[int]:
        tokens = [self.tokenizer.special_tokens["<|start_header_id|>"]]
        tokens.extend(self.tokenizer.encode(role, bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def _message(self, message: Message) -> list[int]:
        tokens = self._header(message["role"])
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens

    def _llama2_dialog(self, dialog: Dialog) -> list[int]:
        """Meta's Llama 2 chat_completion: the system prompt folded into the first user message, each
        (user, answer) exchange as `<s>[INST] user [/INST] answer </s>`, then `<s>[INST] user [/INST]`."""
        _check_dialog(dialog, LLAMA2_ROLES)
        messages = [{"role": m["role"], "content": m["content"]} for m in dialog]
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
        tokens += self.tokenizer.encode(
            f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False
        )
        return tokens


def _check_dialog(dialog: Dialog, roles: Sequence[str]) -> None:
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(
            f"a dialog must be a list of messages, each {{'role': ..., 'content': ...}}, got {type(dialog).__name__}"
        )
    if len(dialog) == 0:
        raise ValueError("the dialog is empty: it needs at least one user message")
    for i, message in enumerate(dialog):
        _check_message(message, roles, f"message {i}")


def _check_message(message: Message, roles: Sequence[str], name: str) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"{name} is a {type(message).__name__}, not a dict {{'role': ..., 'content': ...}}")
    role, content = message.get("role"), message.get("content")
    if role not in roles:
        raise ValueError(f"{name} has role {role!r}: the roles of this chat format are {', '.join(roles)}")
    if not isinstance(content, str):
        raise ValueError(f"{name} has content of type {type(content).__name__}: content must be a str")
