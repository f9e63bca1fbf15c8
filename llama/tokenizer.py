"""Llama's tokenizers, picked from the file: Meta's tiktoken BPE (Llama 3) or SentencePiece (Llama 1 and 2),
and ChatFormat, which turns a dialog into prompt tokens exactly as Meta's chat code does for each."""

import binascii
import functools
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import AbstractSet, Literal, Optional, TypedDict, Union

import tiktoken
from sentencepiece import SentencePieceProcessor

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

PathLike = Union[str, os.PathLike]

EXPECTED_FILE = (
    "a tokenizer.model is either Meta's Llama 3 tiktoken BPE file (text lines '<base64 token> <rank>') "
    "or a Llama 1/2 SentencePiece model (a protobuf)"
)

# -- Llama 3: tiktoken BPE -------------------------------------------------------------------------------------

# Meta's split pattern: the pre-tokenizer regex that cuts text into words before BPE merges bytes.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's Llama 3.1 special tokens, in order after the BPE ranks (128000..128255 for the real file).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(3, NUM_RESERVED_SPECIAL_TOKENS - 8)]

# tiktoken panics on inputs much longer than this, so Meta encodes 400,000 characters at a time.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# tiktoken's BPE is slow on (and its regex recurses on) long runs of whitespace or of non-whitespace
# (https://github.com/openai/tiktoken/issues/195): Meta cuts such runs every 25,000 characters.
MAX_NO_WHITESPACES_CHARS = 25_000
# A line of a tiktoken BPE file: a base64 token and its rank (as bytes, to recognise the file; as text, to read it).
_BPE_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+\s*")
_BPE_TEXT_LINE = re.compile(r"[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+[ \t]*")


class Tokenizer:
    """Llama's tokenizer. `Tokenizer(model_path)` reads the file and gives the one it holds: a
    TiktokenTokenizer (Llama 3) or a SentencePieceTokenizer (Llama 1 and 2)."""

    kind: Literal["tiktoken", "sentencepiece"]
    model_path: Path
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: list[int]

    def __new__(cls, model_path: Optional[PathLike] = None):
        if cls is Tokenizer:
            cls = _tokenizer_class(model_path)
        return super().__new__(cls)

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        raise NotImplementedError

    def decode(self, t: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_path)!r}, n_words={self.n_words})"


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: byte-level BPE with tiktoken, then 256 special tokens."""

    kind = "tiktoken"
    pat_str = PAT_STR

    def __init__(self, model_path: PathLike):
        self.model_path = Path(model_path)
        mergeable_ranks = _read_bpe_ranks(self.model_path)
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {t: num_base_tokens + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=self.model_path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = num_base_tokens + len(SPECIAL_TOKENS)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = -1
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str], Collection[str]] = (),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> list[int]:
        """Token ids of `s`. By default special-token strings in `s` (say "<|eot_id|>") are encoded as the
        plain text they are; allowed_special="all" (or a set of them) encodes them as special tokens, and
        disallowed_special="all" raises a ValueError when `s` holds one. Lone surrogates become U+FFFD."""
        _check_text(s)
        s = _utf8_encodable(s)
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise ValueError(
                f"allowed_special is {allowed_special!r}: give 'all' or a set of special-token strings"
            )
        if allowed_special != "all":
            allowed_special = set(allowed_special)  # tiktoken subtracts it from a set
            unknown = allowed_special - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"allowed_special holds {sorted(unknown)}, which are not special tokens")
        t: list[int] = []
        for piece in _split_for_tiktoken(s):
            t.extend(
                self.model.encode(
                    piece, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
            )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """The text of token ids; bytes that do not form UTF-8 (a character cut between ids) become U+FFFD."""
        return self.model.decode(_checked_ids(t, self.n_words))


def _split_for_tiktoken(
    s: str, chunk_chars: int = TIKTOKEN_MAX_ENCODE_CHARS, run_chars: int = MAX_NO_WHITESPACES_CHARS
) -> Iterator[str]:
    """The pieces Meta gives tiktoken: chunks of `chunk_chars` characters, each cut wherever a run of
    whitespace or of non-whitespace reaches `run_chars` characters. Equal to Meta's loop over characters."""
    long_run = _long_run_pattern(run_chars)
    for i in range(0, len(s), chunk_chars):
        chunk = s[i : i + chunk_chars]
        start = 0
        for run in long_run.finditer(chunk):
            for cut in range(run.start() + run_chars, run.end(), run_chars):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


@functools.lru_cache
def _long_run_pattern(run_chars: int) -> re.Pattern:
    # A run longer than run_chars, tried only from a run's first character (the lookbehinds), so that the
    # search stays linear in the text's length. re's \s is exactly str.isspace, which Meta's loop uses.
    return re.compile(rf"(?<!\s)\s{{{run_chars + 1},}}|(?<!\S)\S{{{run_chars + 1},}}")


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """The {token bytes: rank} of a tiktoken BPE file, refusing one that would make tiktoken misbehave."""
    data = _read_file(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of base64 tokens and ranks: {EXPECTED_FILE}") from None
    ranks: dict[bytes, int] = {}
    n_lines = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            if not _BPE_TEXT_LINE.fullmatch(line):
                if not line.strip():  # Meta's loader skips blank lines
                    continue
                raise ValueError
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)  # binascii.Error: bad padding
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path} line {lineno} is {line[:60]!r}, not '<base64 token> <rank>': the file is damaged or "
                f"truncated ({EXPECTED_FILE})"
            ) from None
        n_lines += 1
    if len(ranks) != n_lines:
        raise ValueError(f"{path} lists some token twice: the file is damaged ({EXPECTED_FILE})")
    if set(ranks.values()) != set(range(len(ranks))):
        # Special tokens are numbered from len(ranks) on, so ranks must be exactly 0..len-1.
        raise ValueError(
            f"{path} has ranks that are not 0..{len(ranks) - 1}, each once: the file is damaged or truncated "
            f"({EXPECTED_FILE})"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # tiktoken encodes any text through single bytes and panics on a byte it has no token for.
        raise ValueError(
            f"{path} has no token for {len(missing)} of the 256 single bytes (e.g. {bytes([missing[0]])!r}): a "
            f"byte-level BPE file lists every byte; the file is damaged or truncated ({EXPECTED_FILE})"
        )
    return ranks


# -- Llama 1 and 2: SentencePiece -----------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """Meta's Llama 1/2 tokenizer: a SentencePiece model, with <s> and </s> as BOS and EOS."""

    kind = "sentencepiece"

    def __init__(self, model_path: PathLike):
        self.model_path = Path(model_path)
        data = _read_file(self.model_path)
        try:
            self.sp_model = SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError):
            raise ValueError(
                f"{self.model_path} is not a SentencePiece model that SentencePiece can load: the file is "
                f"damaged or truncated ({EXPECTED_FILE})"
            ) from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if not (0 <= self.bos_id < self.n_words and 0 <= self.eos_id < self.n_words):
            raise ValueError(
                f"{self.model_path} is a SentencePiece model without BOS and EOS tokens, so not a Llama "
                f"tokenizer ({EXPECTED_FILE})"
            )
        self.stop_tokens: list[int] = [self.eos_id]

    # bos and eos may be given by position here, as Meta's Llama 2 tokenizer allows.
    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with BOS and EOS when asked. Lone surrogates become U+FFFD."""
        _check_text(s)
        t = self.sp_model.encode(_utf8_encodable(s))
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """The text of token ids; BOS, EOS and other control tokens give no text."""
        return self.sp_model.decode(_checked_ids(t, self.n_words))


# -- Reading files and checking arguments ---------------------------------------------------------------------


def _check_path(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer file at {path}: pass the path of the model's tokenizer.model")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder: pass the path of the tokenizer.model file in it")


def _read_file(path: Path) -> bytes:
    _check_path(path)
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty: {EXPECTED_FILE}; download it again")
    return data


def _tokenizer_class(model_path: Optional[PathLike]) -> type:
    """The tokenizer class for a file, from its first bytes."""
    if model_path is None:
        raise TypeError("Tokenizer() needs model_path, the path of a tokenizer.model file")
    path = Path(model_path)
    _check_path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise ValueError(f"{path} is empty: {EXPECTED_FILE}; download it again")
    first_line = head.lstrip(b"\r\n").split(b"\n", 1)[0]
    if _BPE_LINE.fullmatch(first_line):
        return TiktokenTokenizer
    # A SentencePiece ModelProto starts with its first vocabulary piece: field 1, length-delimited (0x0a).
    if head[:1] == b"\n":
        return SentencePieceTokenizer
    raise ValueError(f"{path} is neither kind of tokenizer file: {EXPECTED_FILE}")


def _check_text(s: str) -> None:
    if not isinstance(s, str):
        raise TypeError(
            f"encode takes a str, got {type(s).__name__}"
            + (": decode it first" if isinstance(s, bytes) else "")
        )


def _utf8_encodable(s: str) -> str:
    """`s` with lone surrogates (which UTF-8 cannot hold) replaced by U+FFFD and surrogate pairs joined,
    as tiktoken does for itself; a str that UTF-8 can hold is returned unchanged."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _checked_ids(t: Sequence[int], n_words: int) -> list[int]:
    ids = t.tolist() if hasattr(t, "tolist") else list(t)  # tensors and arrays too
    if ids and (min(ids) < 0 or max(ids) >= n_words):
        i, bad = next((i, x) for i, x in enumerate(ids) if not 0 <= x < n_words)
        raise ValueError(
            f"token id {bad} (at position {i}) is out of range: this tokenizer's ids are 0..{n_words - 1}; "
            "were the ids made by another tokenizer, or is a pad id (-1) left in?"
        )
    return ids


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

    def __init__(self, tokenizer: Tokenizer):
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
