"""Tokenizer: Meta's published ids, round trips over generated text, long inputs against Meta's splitting,
SentencePiece ids against sentencepiece itself, and hostile files and ids."""

import base64
import json
import random
import re
import sys

import pytest
import tiktoken
import tiktoken.load
import tokenizer_paths
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import SentencePieceProcessor

from llama.tokenizer import (
    SPECIAL_TOKENS,
    Llama4Tokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    _split_for_tiktoken,
)

# The shared fixtures: the real Llama 3 and Llama 2 files, and the tiny byte-level one.
llama3_path, llama2_path, byte_path = (
    tokenizer_paths.llama3_path,
    tokenizer_paths.llama2_path,
    tokenizer_paths.byte_path,
)
llama3, llama2, byte_tokenizer = (
    tokenizer_paths.llama3,
    tokenizer_paths.llama2,
    tokenizer_paths.byte_tokenizer,
)

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Meta's split pattern, copied here from Meta's llama3 tokenizer.py, so that the reference below does not
# share a line with the code under test.
META_PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


def meta_split_whitespaces_or_nonwhitespaces(s, max_consecutive_slice_len):
    """Meta's Tokenizer._split_whitespaces_or_nonwhitespaces, as written in its llama3 repository."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def meta_pieces(s, chunk_chars=400_000, run_chars=25_000):
    """The substrings Meta's encode gives tiktoken."""
    return [
        piece
        for i in range(0, len(s), chunk_chars)
        for piece in meta_split_whitespaces_or_nonwhitespaces(s[i : i + chunk_chars], run_chars)
    ]


@pytest.fixture(scope="module")
def reference_encoding(llama3_path):
    """tiktoken's own Encoding of the file with Meta's pattern, built without llama.tokenizer."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(llama3_path))
    return tiktoken.Encoding("reference", pat_str=META_PAT_STR, mergeable_ranks=ranks, special_tokens={})


def meta_encode(encoding, s):
    return [t for piece in meta_pieces(s) for t in encoding.encode(piece, disallowed_special=())]


# -- Generated text -------------------------------------------------------------------------------------------

SPECIAL_STRINGS = SPECIAL_TOKENS[:12] + ["<|image|>", "<s>", "</s>", "[INST]", "<<SYS>>\n", "<|", "|>"]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "SELECT * FROM t WHERE id = 'x';",
    '<div class="a">&amp;</div>',
    "  \t\r\n",
    'println!("{:?}", v);',
]
# Any unicode except lone surrogates (tested on their own below), over every category.
unicode_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
fragments = st.one_of(
    unicode_text,
    st.sampled_from(
        SPECIAL_STRINGS + CODE + ["🦙", "👩‍👩‍👧", "🇫🇷", "é", "e\u0301", "\x00", "\ufeff", "ǅ", "ß"]
    ),
    st.text(" \t\n\r\x0b\x0c\u00a0\u2028\u3000", min_size=1, max_size=60),  # whitespace runs
    st.from_regex(r"[0-9]{1,30}", fullmatch=True),
    st.text("abcXYZ'sdtlmrev", min_size=1, max_size=20),  # the contractions of the split pattern
)
texts = st.lists(fragments, max_size=12).map("".join)


def utf16_cleaned(s):
    """What tiktoken itself makes of a str that UTF-8 cannot hold: pairs joined, lone surrogates to U+FFFD."""
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# -- Llama 3 (tiktoken) ---------------------------------------------------------------------------------------


def test_llama3_gives_metas_published_ids(llama3):
    ids = llama3.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_llama3_has_metas_special_tokens_in_metas_order(llama3):
    assert (
        isinstance(llama3, TiktokenTokenizer) and isinstance(llama3, Tokenizer) and llama3.kind == "tiktoken"
    )
    assert llama3.n_words == 128256 and len(llama3.special_tokens) == 256
    named = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {name: llama3.special_tokens[name] for name in named} == named
    assert sorted(llama3.special_tokens.values()) == list(range(128000, 128256))
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, -1)
    assert (llama3.eot_id, llama3.eom_id, llama3.python_tag_id) == (128009, 128008, 128010)
    assert llama3.stop_tokens == [128001, 128008, 128009]
    assert [llama3.decode([i]) for i in range(128000, 128256)] == SPECIAL_TOKENS


def test_special_token_strings_in_text_encode_as_plain_text(llama3):
    for name in llama3.special_tokens:
        ids = llama3.encode(f"a {name} b", bos=False, eos=False)
        assert max(ids) < 128000, name
        assert llama3.decode(ids) == f"a {name} b"
    assert llama3.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    assert llama3.encode("x<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"})[-1] == 128009
    with pytest.raises(ValueError, match="special token"):
        llama3.encode("x<|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="give 'all' or a set"):
        llama3.encode("x", bos=False, eos=False, allowed_special="<|eot_id|>")
    with pytest.raises(ValueError, match="not special tokens"):
        llama3.encode("x", bos=False, eos=False, allowed_special={"<|no_such_token|>"})


@SETTINGS
@given(s=texts)
def test_llama3_round_trips_and_equals_tiktoken_on_generated_text(llama3, reference_encoding, s):
    ids = llama3.encode(s, bos=False, eos=False)
    assert llama3.decode(ids) == s
    assert ids == reference_encoding.encode(s, disallowed_special=())
    assert max(ids, default=0) < 128000  # special-token strings are text
    assert llama3.encode(s, bos=True, eos=True) == [128000] + ids + [128001]


@SETTINGS
@given(s=st.text(st.characters(exclude_categories=()), max_size=30))
def test_lone_surrogates_encode_as_tiktoken_does_never_raising(llama3, reference_encoding, s):
    # UTF-8 cannot hold a lone surrogate: encode takes the str as tiktoken does (surrogate pairs joined,
    # lone ones as U+FFFD), so decode gives that back rather than `s`.
    ids = llama3.encode(s, bos=False, eos=False)
    assert llama3.decode(ids) == utf16_cleaned(s)
    assert ids == reference_encoding.encode(s, disallowed_special=())


def test_surrogates_and_nul_bytes(llama3):
    assert llama3.decode(llama3.encode("a\ud800b", bos=False, eos=False)) == "a\ufffdb"
    assert llama3.decode(llama3.encode("\ud83d\ude00", bos=False, eos=False)) == "😀"  # a pair joins
    for s in ("\x00", "a\x00b", "\x00" * 1000, "<|eot_id|>\x00<|eot_id|>"):
        assert llama3.decode(llama3.encode(s, bos=False, eos=False)) == s


def test_encode_refuses_what_is_not_a_str(llama3, llama2):
    for tokenizer in (llama3, llama2):
        for bad in (b"bytes", None, 3, ["a"]):
            with pytest.raises(TypeError, match="str"):
                tokenizer.encode(bad, bos=False, eos=False)


# -- Long inputs: Meta's splitting ----------------------------------------------------------------------------


def test_re_whitespace_is_str_isspace_over_all_of_unicode():
    # The splitter finds runs with re's \s where Meta's loop asks str.isspace: they must agree everywhere.
    every_char = "".join(map(chr, range(sys.maxunicode + 1)))
    assert [m.start() for m in re.finditer(r"\s", every_char)] == [
        i for i, c in enumerate(every_char) if c.isspace()
    ]


run_texts = st.lists(
    st.tuples(st.sampled_from([" ", "\n", "\u3000", "a", "é", "🦙", "1", "\x00"]), st.integers(1, 25)),
    max_size=12,
).map(lambda runs: "".join(c * n for c, n in runs))


@settings(max_examples=400, deadline=None)
@given(s=run_texts, chunk_chars=st.integers(1, 40), run_chars=st.integers(1, 12))
def test_the_splitter_cuts_where_metas_loop_cuts(s, chunk_chars, run_chars):
    assert list(_split_for_tiktoken(s, chunk_chars, run_chars)) == meta_pieces(s, chunk_chars, run_chars)


def long_text(n_chars, seed=0):
    """Prose, code, numbers, unicode and whitespace, `n_chars` long."""
    rng = random.Random(seed)
    words = ["the", "Llama", "tokenizer", "42", "1999", "é", "naïve", "日本語", "🦙", "<|eot_id|>", "x = y;"]
    words += ["\n", "\n\n", "  ", "\t", "'s", "don't", "Ελληνικά", "\x00"]
    out, size = [], 0
    while size < n_chars:
        word = rng.choice(words) + rng.choice([" ", "", ", ", ".\n"])
        out.append(word)
        size += len(word)
    return "".join(out)[:n_chars]


LONG_INPUTS = {
    "a million characters of mixed text": lambda: long_text(1_000_000),
    "a 100,000-space run": lambda: "a" + " " * 100_000 + "b",
    "a 100,000-character word": lambda: "x" * 100_000,
    "a run of 60,000 newlines then 60,000 emoji": lambda: "\n" * 60_000 + "🦙" * 60_000,
    "runs across the 400,000 boundary": lambda: long_text(380_000, seed=1) + " " * 50_000 + "y" * 30_000,
    "exactly 400,000 characters": lambda: long_text(400_000, seed=2),
    "400,001 characters": lambda: long_text(400_001, seed=3),
}


@pytest.mark.parametrize("name", LONG_INPUTS)
def test_long_inputs_match_metas_encoding_and_round_trip(llama3, reference_encoding, name):
    s = LONG_INPUTS[name]()
    ids = llama3.encode(s, bos=True, eos=False)
    assert ids[1:] == meta_encode(reference_encoding, s)
    assert llama3.decode(ids[1:]) == s


def test_long_input_without_long_runs_is_one_tiktoken_call_per_chunk(llama3, reference_encoding):
    # Under 400,000 characters and with no run of 25,000, Meta's splitting changes nothing.
    s = long_text(399_999, seed=4)
    assert llama3.encode(s, bos=False, eos=False) == reference_encoding.encode(s, disallowed_special=())


# -- The tiny byte-level file of the tiny-checkpoint generator ------------------------------------------------


def test_a_file_of_the_256_bytes_is_a_llama3_tokenizer_with_specials_from_256(byte_tokenizer):
    assert isinstance(byte_tokenizer, TiktokenTokenizer)
    assert byte_tokenizer.n_words == 512 and (byte_tokenizer.bos_id, byte_tokenizer.eos_id) == (256, 257)
    assert byte_tokenizer.special_tokens["<|eot_id|>"] == 265 and byte_tokenizer.stop_tokens == [
        257,
        264,
        265,
    ]
    assert byte_tokenizer.encode("hé", bos=True, eos=False) == [256, *"hé".encode()]


@SETTINGS
@given(s=texts)
def test_the_byte_tokenizer_round_trips(byte_tokenizer, s):
    ids = byte_tokenizer.encode(s, bos=False, eos=False)
    assert ids == list(s.encode()) and byte_tokenizer.decode(ids) == s


# -- Llama 1/2 (SentencePiece) --------------------------------------------------------------------------------

SP_STRINGS = [
    "This is a test sentence.",
    "",
    " leading space",
    "  two  spaces\n\ttab\n",
    "naïve café 日本語 🦙",
    "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]",
    "a\x00b",
    "<s>text</s>",
    "1234567890 3.14159",
]


@pytest.fixture(scope="module")
def sp(llama2_path):
    """sentencepiece's own processor of the Llama 2 file."""
    return SentencePieceProcessor(model_file=str(llama2_path))


def test_llama2_ids_equal_sentencepieces(llama2, sp):
    assert isinstance(llama2, SentencePieceTokenizer) and llama2.kind == "sentencepiece"
    assert (llama2.n_words, llama2.bos_id, llama2.eos_id, llama2.pad_id) == (32000, 1, 2, -1)
    assert llama2.stop_tokens == [2] and not hasattr(llama2, "special_tokens")
    for s in SP_STRINGS:
        ids = sp.encode(s)
        assert llama2.encode(s, bos=False, eos=False) == ids
        assert llama2.encode(s, bos=True, eos=False) == [1] + ids
        assert llama2.encode(s, bos=False, eos=True) == ids + [2]
        assert llama2.encode(s, bos=True, eos=True) == [1] + ids + [2]
        assert llama2.encode(s, True, True) == [1] + ids + [2]  # positional, as Meta's Llama 2 allows
        assert llama2.decode([1] + ids + [2]) == sp.decode(ids)


@SETTINGS
@given(s=st.text(st.characters(exclude_categories=()), max_size=30) | texts)
def test_llama2_encode_never_raises_and_equals_sentencepiece(llama2, sp, s):
    assert llama2.encode(s, bos=False, eos=False) == sp.encode(utf16_cleaned(s))


def test_llama2_takes_lone_surrogates(llama2):
    assert llama2.decode(llama2.encode("a\udc80b", bos=True, eos=False)) == "a\ufffdb"


# -- Decoding ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama3", "llama2", "byte_tokenizer"])
def test_decode_of_any_ids_in_range_never_raises(name, request):
    tokenizer = request.getfixturevalue(name)

    @SETTINGS
    @given(ids=st.lists(st.integers(0, tokenizer.n_words - 1), max_size=50))
    def decode_any(ids):
        assert isinstance(tokenizer.decode(ids), str)

    decode_any()


@pytest.mark.parametrize("name", ["llama3", "llama2", "byte_tokenizer"])
def test_ids_out_of_range_are_a_clear_value_error(name, request):
    tokenizer = request.getfixturevalue(name)
    top = tokenizer.n_words - 1
    for bad in (tokenizer.n_words, -1, 2**40, -(2**40)):
        with pytest.raises(
            ValueError, match=rf"token id {bad} \(at position 1\) is out of range.* 0\.\.{top}"
        ):
            tokenizer.decode([0, bad, 0])
    assert tokenizer.decode(torch.tensor([0, top])) == tokenizer.decode([0, top])  # tensors decode too
    assert tokenizer.decode([]) == ""


# -- Hostile files --------------------------------------------------------------------------------------------

FILE_EXPECTED = "tiktoken BPE file.*SentencePiece model"


def test_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.model"))):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        Tokenizer(str(tmp_path))


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match=f"is empty.*{FILE_EXPECTED}"):
        Tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
def test_a_real_file_cut_in_half_is_refused(tmp_path, kind, request):
    data = request.getfixturevalue(f"{kind}_path").read_bytes()
    (tmp_path / "half.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        Tokenizer(tmp_path / "half.model")


def test_a_bpe_file_cut_inside_a_line_is_refused(tmp_path, llama3_path):
    lines = llama3_path.read_text().splitlines(keepends=True)[:5000]
    for cut in ("token", "token ", "token rank"):  # the last line cut in its token, after it, in its rank
        last = {"token": lines[-1][:3], "token ": lines[-1].split()[0] + " ", "token rank": lines[-1][:-3]}[
            cut
        ]
        (tmp_path / "cut.model").write_text("".join(lines[:-1]) + last)
        with pytest.raises(ValueError, match="damaged or truncated"):
            Tokenizer(tmp_path / "cut.model")


WRONG_FILES = {
    "random bytes": random.Random(0).randbytes(10_000),
    "random bytes starting like a protobuf": b"\n" + random.Random(1).randbytes(10_000),
    "a Hugging Face tokenizer.json": json.dumps(
        {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
    ).encode(),
    "a pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",
    "a text file": b"hello world\n",
    "UTF-8 text that looks like BPE lines": "SGk= 0\nw6k= 1\n🦙 2\n".encode(),
    "bad base64": b"IQ== 0\nI!== 1\n",
    "BPE lines without the 256 bytes": b"YQ== 0\nYg== 1\n",
    "duplicate ranks": b"".join(b"%s 0\n" % base64.b64encode(bytes([b])) for b in range(256)),
    "a negative rank": b"IQ== -1\n",
}


@pytest.mark.parametrize("name", WRONG_FILES)
def test_a_file_of_the_wrong_format_is_refused_saying_what_it_should_be(tmp_path, name):
    (tmp_path / "tokenizer.model").write_bytes(WRONG_FILES[name])
    with pytest.raises(ValueError, match=FILE_EXPECTED):
        Tokenizer(tmp_path / "tokenizer.model")


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_a_file_load_or_raise_a_value_error(tmp_path, data):
    (tmp_path / "tokenizer.model").write_bytes(data)
    try:
        tokenizer = Tokenizer(tmp_path / "tokenizer.model")
    except ValueError:
        return
    assert "any text" in tokenizer.decode(tokenizer.encode("any text", bos=True, eos=True))


@SETTINGS
@given(data=st.data())
def test_a_damaged_sentencepiece_file_loads_or_raises_a_value_error(tmp_path, llama2_path, data):
    blob = bytearray(llama2_path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    (tmp_path / "tokenizer.model").write_bytes(bytes(blob))
    try:
        tokenizer = Tokenizer(tmp_path / "tokenizer.model")
    except ValueError:
        return
    tokenizer.decode(tokenizer.encode("any text ü 🦙", bos=True, eos=True))


# -- Llama 4 (tiktoken, 200,000 ranks): Meta's llama-models tokenizer as witness ---------------------------------


llama4, llama4_path = tokenizer_paths.llama4, tokenizer_paths.llama4_path


@pytest.fixture(scope="module")
def meta_llama4(llama4_path):
    from meta_reference import meta

    return meta("llama4")[2].Tokenizer(llama4_path)


def test_llama4_is_picked_from_the_file_with_metas_special_tokens(llama4, meta_llama4):
    assert isinstance(llama4, Llama4Tokenizer) and llama4.kind == "tiktoken"
    assert llama4.special_tokens == meta_llama4.special_tokens and len(llama4.special_tokens) == 2048
    assert llama4.n_words == meta_llama4.n_words == 202048
    assert (llama4.bos_id, llama4.eos_id, llama4.pad_id) == (200000, 200001, meta_llama4.pad_id)
    assert llama4.stop_tokens == meta_llama4.stop_tokens == [200001, 200007, 200008]  # <|end_of_text|> <|eom|> <|eot|>
    assert (llama4.eot_id, llama4.eom_id) == (200008, 200007)


LLAMA4_HARD = [
    "This is a test sentence.",
    "I'M here and YOU'RE there; they'll've gone",  # o200k's contractions differ from Llama 3's
    "http://example.com/a/b/c?d=e//f",  # "/" ends a punctuation run in Llama 4's pattern
    "CamelCaseWords and HTTPServer",
    "12345678 3.14159 1,000,000",
    "\n\n\t  \r\n  x",
    "<|header_start|>user<|header_end|><|eot|><|eom|><|python_start|><|begin_of_text|>",
    "naïve café 日本語 🦙 👩‍👩‍👧 🇫🇷 e\u0301",
    "\x00\ufeff",
] + CODE


def test_llama4_ids_equal_metas_on_hard_strings(llama4, meta_llama4):
    for s in LLAMA4_HARD + [LONG_INPUTS[name]() for name in ("a 100,000-space run", "400,001 characters")]:
        ids = llama4.encode(s, bos=True, eos=True)
        assert ids == meta_llama4.encode(s, bos=True, eos=True), s[:40]
        assert max(ids[1:-1], default=0) < 200000  # special-token strings are text
        assert llama4.decode(ids[1:-1]) == s


@SETTINGS
@given(s=texts)
def test_llama4_ids_equal_metas_on_generated_text(llama4, meta_llama4, s):
    ids = llama4.encode(s, bos=False, eos=False)
    assert ids == meta_llama4.encode(s, bos=False, eos=False)
    assert llama4.decode(ids) == s


def test_a_llama4_tokenizer_reads_a_small_file_when_asked(byte_path):
    # Tokenizer(path) takes 256 ranks as Llama 3's; Llama4Tokenizer(path) reads them as Llama 4's.
    small = Llama4Tokenizer(byte_path)
    assert small.n_words == 256 + 2048 and small.special_tokens["<|eot|>"] == 256 + 8
    assert isinstance(Tokenizer(byte_path), TiktokenTokenizer) and not isinstance(Tokenizer(byte_path), Llama4Tokenizer)
