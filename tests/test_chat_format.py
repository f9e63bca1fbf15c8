"""ChatFormat: Llama 3 headers with Meta's published ids, Llama 2 [INST] prompts against ids built here from
sentencepiece with Meta's formula, malformed dialogs, and Llama 2's special-tag check."""

import pytest
import tokenizer_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import SentencePieceProcessor

from llama.tokenizer import ChatFormat, Message, has_special_tags

llama3, llama2, llama2_path = tokenizer_paths.llama3, tokenizer_paths.llama2, tokenizer_paths.llama2_path
llama3_path, byte_path, byte_tokenizer = (
    tokenizer_paths.llama3_path,
    tokenizer_paths.byte_path,
    tokenizer_paths.byte_tokenizer,
)

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


# -- Llama 3 --------------------------------------------------------------------------------------------------


def test_llama3_message_and_dialog_give_metas_published_ids(llama3):
    formatter = ChatFormat(llama3)
    assert formatter.style == "llama3"
    assert formatter.encode_message(msg("user", "This is a test sentence.")) == [
        128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
    ]  # fmt: skip
    dialog = [msg("system", "This is a test sentence."), msg("user", "This is a response.")]
    assert formatter.encode_dialog_prompt(dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271,
    ]  # fmt: skip
    assert formatter.encode_header(msg("assistant", "")) == [128006, 78191, 128007, 271]


def llama3_expected(tokenizer, dialog):
    """Meta's Llama 3 format, spelled out with the tokenizer's encode and its special-token ids."""
    special = tokenizer.special_tokens
    tokens = [special["<|begin_of_text|>"]]
    for m in [*dialog, msg("assistant", None)]:
        tokens += [special["<|start_header_id|>"], *tokenizer.encode(m["role"], bos=False, eos=False)]
        tokens += [special["<|end_header_id|>"], *tokenizer.encode("\n\n", bos=False, eos=False)]
        if m["content"] is not None:
            tokens += [*tokenizer.encode(m["content"].strip(), bos=False, eos=False), special["<|eot_id|>"]]
    return tokens


contents = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>", "  padded \n", "[INST]"]),
)
llama3_dialogs = st.builds(
    lambda first, middle, last: first + middle + [last],
    st.lists(st.builds(msg, st.just("system"), contents), max_size=1),
    st.lists(st.builds(msg, st.sampled_from(["user", "assistant", "ipython"]), contents), max_size=4),
    st.builds(msg, st.sampled_from(["user", "ipython"]), contents),
)


@pytest.mark.parametrize("name", ["llama3", "byte_tokenizer"])
def test_llama3_dialogs_follow_metas_format(name, request):
    tokenizer = request.getfixturevalue(name)
    formatter = ChatFormat(tokenizer)

    @SETTINGS
    @given(dialog=llama3_dialogs)
    def check(dialog):
        tokens = formatter.encode_dialog_prompt(dialog)
        assert tokens == llama3_expected(tokenizer, dialog)
        # Special-token strings in content are text: the only control tokens are the format's own.
        specials = [t for t in tokens if t >= tokenizer.n_words - 256]
        assert len(specials) == 1 + 3 * len(dialog) + 2

    check()


def test_llama3_messages_strip_their_content(llama3):
    formatter = ChatFormat(llama3)
    assert formatter.encode_message(msg("user", "  hi \n\n")) == formatter.encode_message(msg("user", "hi"))
    header = formatter.encode_header(msg("ipython", ""))
    assert formatter.encode_message(msg("ipython", " {} "))[: len(header)] == header
    assert formatter.encode_message(msg("ipython", " {} "))[len(header) :] == [
        *llama3.encode("{}", bos=False, eos=False),
        128009,
    ]


# -- Llama 2 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp(llama2_path):
    return SentencePieceProcessor(model_file=str(llama2_path))


def llama2_expected(sp, dialog):
    """Meta's Llama 2 chat_completion prompt, built here from sentencepiece directly."""
    bos, eos = sp.bos_id(), sp.eos_id()
    turns = [dict(m) for m in dialog]
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
        turns[0]["content"] = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + turns[0]["content"]
    tokens = []
    for user, answer in zip(turns[::2], turns[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        tokens += [bos] + sp.encode(text) + [eos]
    return tokens + [bos] + sp.encode(f"[INST] {turns[-1]['content'].strip()} [/INST]")


LLAMA2_DIALOGS = {
    "one user message": [msg("user", "What is the recipe of mayonnaise?")],
    "a system prompt": [
        msg("system", "Always answer with Haiku"),
        msg("user", "I am going to Paris, what to see?"),
    ],
    "a conversation": [
        msg("user", "I am going to Paris, what should I see?"),
        msg("assistant", "Paris, the capital of France, is known for ...\n\n1. The Eiffel Tower"),
        msg("user", "What is so great about #1?"),
    ],
    "a system prompt and a conversation": [
        msg("system", "  Be brief.  "),  # Meta does not strip the system prompt on its own
        msg("user", "  Hi!  "),
        msg("assistant", "\nHello.\n"),
        msg("user", "How are you?\t"),
    ],
    "unicode and empty content": [msg("user", "日本語 🦙"), msg("assistant", ""), msg("user", "")],
}


@pytest.mark.parametrize("name", LLAMA2_DIALOGS)
def test_llama2_prompts_equal_metas_formula_on_sentencepiece(llama2, sp, name):
    formatter = ChatFormat(llama2)
    assert formatter.style == "llama2"
    dialog = LLAMA2_DIALOGS[name]
    tokens = formatter.encode_dialog_prompt(dialog)
    assert tokens == llama2_expected(sp, dialog)
    assert tokens[0] == 1 and tokens.count(1) == (len(dialog) - (dialog[0]["role"] == "system") + 1) // 2


def test_llama2_known_prompt_ids(llama2):
    # [INST] hi [/INST] with <s>, as sentencepiece gives it for this vocabulary.
    assert ChatFormat(llama2).encode_dialog_prompt([msg("user", "hi")]) == [
        1,
        733,
        16289,
        28793,
        12014,
        733,
        28748,
        16289,
        28793,
    ]


def test_llama2_message_encoding(llama2):
    formatter = ChatFormat(llama2)
    user = msg("user", " hi ")
    assert formatter.encode_message(user) == formatter.encode_dialog_prompt([user])
    with pytest.raises(ValueError, match="encode_dialog_prompt"):
        formatter.encode_message(msg("assistant", "hello"))
    with pytest.raises(ValueError, match="no message headers"):
        formatter.encode_header(user)


def test_the_special_tag_check():
    for tag in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"):
        assert has_special_tags([msg("user", f"a {tag} b")])
        assert has_special_tags([msg("system", tag), msg("user", "hi")])
        assert has_special_tags([msg("user", "q"), msg("assistant", f"x{tag}"), msg("user", "r")])
    assert not has_special_tags([msg("user", "[INST [SYS] <SYS> INST] <|eot_id|>")])
    assert not has_special_tags([{"role": "user"}, "text", msg("user", "fine")])  # tolerant of malformed


# -- Malformed dialogs ----------------------------------------------------------------------------------------

COMMON_BAD: dict[str, tuple[object, str]] = {
    "an empty dialog": ([], "empty"),
    "a str": ("hello", "list of messages"),
    "a single message": (msg("user", "hi"), "list of messages"),
    "None": (None, "list of messages"),
    "a str message": (["hi"], "message 0 is a str"),
    "no role": ([{"content": "hi"}], "message 0 has role None"),
    "no content": ([{"role": "user"}], "message 0 has content of type NoneType"),
    "int content": ([msg("user", 3)], "content must be a str"),
    "an unknown role": ([msg("bot", "hi")], "message 0 has role 'bot'"),
    "a role that is not a str": ([msg(["user"], "hi")], "message 0 has role"),
}
# Llama 3 and 4 format these, as Meta's does; Llama 2's format cannot.
LLAMA2_BAD = {
    "the last message from the assistant": ([msg("user", "a"), msg("assistant", "b")], "last message"),
    "only a system message": ([msg("system", "s")], "system"),
    "ipython in Llama 2": ([msg("user", "a"), msg("assistant", "b"), msg("ipython", "c")], "role 'ipython'"),
    "two user messages": ([msg("user", "a"), msg("user", "b")], "alternating.*message 1.*'user'"),
    "assistant first": ([msg("assistant", "a"), msg("user", "b")], "message 0 is from 'assistant'"),
    "a late system message": (
        [msg("user", "a"), msg("system", "b"), msg("user", "c")],
        "message 1 is from 'system'",
    ),
    "two system messages": (
        [msg("system", "a"), msg("system", "b"), msg("user", "c")],
        "message 1 is from 'system'",
    ),
}


@pytest.mark.parametrize("name", [*COMMON_BAD, *LLAMA2_BAD])
def test_a_malformed_llama2_dialog_is_a_value_error_saying_what_is_wrong(llama2, name):
    dialog, match = {**COMMON_BAD, **LLAMA2_BAD}[name]
    with pytest.raises(ValueError, match=match):
        ChatFormat(llama2).encode_dialog_prompt(dialog)


@pytest.mark.parametrize("name", COMMON_BAD)
def test_a_malformed_llama3_dialog_is_a_value_error_saying_what_is_wrong(llama3, name):
    dialog, match = COMMON_BAD[name]
    with pytest.raises(ValueError, match=match):
        ChatFormat(llama3).encode_dialog_prompt(dialog)


def test_malformed_messages_are_refused_by_the_message_encoders(llama3):
    formatter = ChatFormat(llama3)
    for bad in ("hi", {"role": "bot", "content": "x"}, {"role": "user", "content": b"x"}):
        for encode in (formatter.encode_message, formatter.encode_header):
            with pytest.raises(ValueError, match="the message"):
                encode(bad)
