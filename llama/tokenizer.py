"""Llama's tokenizers, picked from the file: Meta's tiktoken BPE (Llama 3 or Llama 4) or SentencePiece
(Llama 1 and 2). ChatFormat, the dialog-to-tokens formatter, lives in llama/chat_format.py (which needs nothing
from here) and is imported here too, where Meta's code imports it from."""

import binascii
import functools
import os
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import AbstractSet, Literal, Optional, Union

import tiktoken
from sentencepiece import SentencePieceProcessor

from llama.chat_format import ChatFormat, Dialog, Message, has_special_tags  # noqa: F401 (Meta's import path)

PathLike = Union[str, os.PathLike]

EXPECTED_FILE = (
    "a tokenizer.model is either Meta's Llama 3 or 4 tiktoken BPE file (text lines '<base64 token> <rank>') "
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

# -- Llama 4: tiktoken BPE with 200,000 ranks, its own split pattern and 2,048 special tokens ----------------

LLAMA4_NUM_BPE_RANKS = 200_000
# Llama 4's pre-tokenizer regex (o200k's): words keep a trailing contraction, and "/" ends a punctuation run.
LLAMA4_PAT_STR = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_NUM_SPECIAL_TOKENS = 2048


def _llama4_special_tokens() -> list[str]:
    """Meta's Llama 4 special tokens in order (200000..202047 for the real file): the basic ones, those
    of text post-training, of vision, of reasoning, then generic reserved tokens up to 2,048."""

    def reserved(kind: str, first: int, end: int) -> list[str]:
        return [f"<|{kind}reserved_special_token_{i}|>" for i in range(first, end)]

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += reserved("text_post_train_", 0, 6) + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += reserved("text_post_train_", 8, 69)
    vision = ["<|image_start|>", "<|image_end|>", *reserved("vision_", 0, 2), "<|tile_x_separator|>"]
    vision += ["<|tile_y_separator|>", *reserved("vision_", 2, 6), "<|image|>", *reserved("vision_", 6, 7)]
    vision += ["<|patch|>", *reserved("vision_", 7, 1048)]
    reasoning = reserved("reasoning_", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + reserved("", 0, LLAMA4_NUM_SPECIAL_TOKENS - len(named))


LLAMA4_SPECIAL_TOKENS = _llama4_special_tokens()

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
    TiktokenTokenizer (Llama 3), a Llama4Tokenizer (200,000 BPE ranks) or a SentencePieceTokenizer (Llama 1, 2)."""

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
    special_token_names = SPECIAL_TOKENS
    eot, eom, pad = "<|eot_id|>", "<|eom_id|>", None  # the end-of-turn, end-of-message and padding tokens

    def __init__(self, model_path: PathLike):
        self.model_path = Path(model_path)
        mergeable_ranks = _read_bpe_ranks(self.model_path)
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {t: num_base_tokens + i for i, t in enumerate(self.special_token_names)}
        self.model = tiktoken.Encoding(
            name=self.model_path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = num_base_tokens + len(self.special_token_names)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens[self.eot]
        self.eom_id: int = self.special_tokens[self.eom]
        self.pad_id: int = self.special_tokens[self.pad] if self.pad else -1
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        if "<|python_tag|>" in self.special_tokens:
            self.python_tag_id: int = self.special_tokens["<|python_tag|>"]

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


class Llama4Tokenizer(TiktokenTokenizer):
    """Meta's Llama 4 tokenizer: byte-level BPE with tiktoken (200,000 ranks in the real file), Llama 4's split
    pattern, then 2,048 special tokens. Tokenizer(path) picks it for a file of 200,000 ranks; construct it
    directly to read another file (say a tiny byte-level one) as Llama 4's."""

    pat_str = LLAMA4_PAT_STR
    special_token_names = LLAMA4_SPECIAL_TOKENS
    eot, eom, pad = "<|eot|>", "<|eom|>", "<|finetune_right_pad|>"


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
        # The number of ranks tells Llama 4's file from Llama 3's (128,000) and others.
        n_ranks = sum(1 for line in path.read_bytes().splitlines() if line.strip())
        return Llama4Tokenizer if n_ranks == LLAMA4_NUM_BPE_RANKS else TiktokenTokenizer
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
