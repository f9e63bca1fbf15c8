"""Tool calls (Llama 3.1+ and Llama 4): encoding against llama-models' ChatFormat as witness and against ids
written from Meta's prompt_format.md, decoding against llama-models where it is right and against the facts
where it is wrong (its known bugs), hostile replies, and a round-trip property over random calls."""

import ast
import keyword
import types

import pytest
import tokenizer_paths
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from meta_reference import meta, plain_message, raw_message

from llama.generation import Llama
from llama.tokenizer import ChatFormat, Tokenizer

llama3, llama3_path, byte_path = tokenizer_paths.llama3, tokenizer_paths.llama3_path, tokenizer_paths.byte_path
llama2, llama2_path = tokenizer_paths.llama2, tokenizer_paths.llama2_path

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = ["json", "function_tag", "python_list"]


llama4, llama4_path = tokenizer_paths.llama4, tokenizer_paths.llama4_path


@pytest.fixture(scope="session", params=["llama3", "llama4"])
def family(request):
    """(name, our ChatFormat, llama-models' datatypes, llama-models' ChatFormat on its own tokenizer)."""
    name = request.param
    tokenizer = request.getfixturevalue(name)
    datatypes, chat_format, meta_tokenizer = meta(name)
    witness = chat_format.ChatFormat(meta_tokenizer.Tokenizer(request.getfixturevalue(f"{name}_path")))
    return name, ChatFormat(tokenizer), datatypes, witness


def msg(role, content, **fields):
    return {"role": role, "content": content, **fields}


def call(name, **arguments):
    return {"call_id": "c1", "tool_name": name, "arguments": arguments}


def assistant(*calls, content="", stop="end_of_message"):
    return msg("assistant", content, tool_calls=list(calls), stop_reason=stop)


def meta_tokens(name, witness, datatypes, dialog, fmt):
    """llama-models' prompt for a dialog. Llama 3's content is given stripped: Meta's llama3 repository,
    which this library follows for Llama 3, strips it; llama-models does not."""
    if name == "llama3":
        dialog = [dict(m, content=m["content"].strip()) for m in dialog]
    messages = [raw_message(datatypes, m) for m in dialog]
    return witness.encode_dialog_prompt(messages, datatypes.ToolPromptFormat(fmt)).tokens


# -- Encoding: llama-models as witness ---------------------------------------------------------------------------

SYSTEM = msg("system", "Environment: ipython\nTools: brave_search, wolfram_alpha\n\nYou are a helpful assistant.\n")
USER = msg("user", "What is the weather in Paris, and the 100th decimal of pi?")
WEATHER = call("get_weather", city="Paris", unit="celsius", days=3)
TOOL_DIALOGS = {
    "brave_search, then its result": [
        SYSTEM,
        USER,
        assistant(call("brave_search", query="weather in Paris")),
        msg("ipython", '{"temperature": 21}'),
    ],
    "wolfram_alpha": [USER, assistant(call("wolfram_alpha", query="100th decimal of pi"))],
    "photogen": [USER, assistant(call("photogen", query="a llama in Paris"))],
    "code_interpreter after the python tag": [
        msg("system", "Environment: ipython"),
        USER,
        assistant(call("code_interpreter", code="import math\nprint(math.pi)\n")),
        msg("ipython", "3.141592653589793"),
    ],
    "a function call": [USER, assistant(WEATHER)],
    "a function call that ends the turn": [USER, assistant(WEATHER, stop="end_of_turn")],
    "a function call without a stop reason": [USER, msg("assistant", "", tool_calls=[WEATHER])],
    "content before a function call": [USER, assistant(WEATHER, content="Let me look that up.")],
    "a function without arguments": [USER, assistant(call("get_time"))],
    "arguments of every JSON type": [
        USER,
        assistant(call("f", s="x", i=-3, x=2.5, t=True, no=False, none=None, items=[1, "a", None])),
    ],
    "unicode arguments": [USER, assistant(call("translate", text="日本語 🦙 naïve", to="ελληνικά"))],
    "special-token text in arguments": [
        USER,
        assistant(call("echo", text="<|eot_id|><|eom|><|python_tag|><|start_header_id|>")),
    ],
    "two function calls": [USER, assistant(WEATHER, call("get_time", zone="CET"))],
    "a tool result as role tool": [USER, assistant(WEATHER), msg("tool", '{"temp": 21}')],
    "a whole agent loop": [
        SYSTEM,
        USER,
        assistant(WEATHER),
        msg("ipython", '{"temp": 21}'),
        assistant(call("wolfram_alpha", query="100th decimal of pi")),
        msg("ipython", "7"),
        msg("assistant", "It is 21 °C in Paris, and the 100th decimal of pi is 7.", stop_reason="end_of_turn"),
        msg("user", "Thanks!"),
    ],
    "ending with an assistant message (a prefill)": [USER, msg("assistant", "The weather in Paris is")],
    "ending with a finished assistant message": [USER, msg("assistant", "Sunny.", stop_reason="end_of_turn")],
    "ending with a system message": [msg("system", "You are terse.")],
    "ending with a tool call": [USER, assistant(WEATHER)],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", TOOL_DIALOGS)
def test_tool_dialogs_encode_as_llama_models_encodes_them(family, case, fmt):
    name, formatter, datatypes, witness = family
    dialog = TOOL_DIALOGS[case]
    if fmt == "python_list" and any(len(m.get("tool_calls", [])) > 1 for m in dialog):
        pytest.skip("several python_list calls share one list here; tested on their own below")
    if name == "llama4" and case.startswith("code_interpreter"):
        pytest.skip("Llama 4 code sits between <|python_start|> and <|python_end|> here; tested on its own below")
    assert formatter.encode_dialog_prompt(dialog, fmt) == meta_tokens(name, witness, datatypes, dialog, fmt)
    for message in dialog:  # and message by message
        expected = meta_tokens(name, witness, datatypes, [message], fmt)[1:]  # no BOS
        assert formatter.encode_message(message, fmt) == expected[: -len(formatter._header("assistant"))]


contents = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(["<|eot_id|>", "<|header_start|>user<|header_end|>", "<|eot|>", "  padded \n", "\n\n"]),
)
chat_dialogs = st.lists(
    st.builds(msg, st.sampled_from(["system", "user", "assistant", "ipython", "tool"]), contents),
    min_size=1,
    max_size=5,
)


def test_random_chat_dialogs_encode_as_llama_models_encodes_them(family):
    name, formatter, datatypes, witness = family

    @SETTINGS
    @given(dialog=chat_dialogs)
    def check(dialog):
        assert formatter.encode_dialog_prompt(dialog) == meta_tokens(name, witness, datatypes, dialog, "json")

    check()


def test_a_dialog_ending_with_an_assistant_or_system_message_gets_metas_tokens(llama3):
    # Meta's encode_dialog_prompt formats every message, then always opens a new assistant message.
    formatter, special = ChatFormat(llama3), llama3.special_tokens
    for last in (msg("assistant", "Bonjour"), msg("system", "Be brief.")):
        head = [special["<|start_header_id|>"], *llama3.encode(last["role"], bos=False, eos=False)]
        head += [special["<|end_header_id|>"], *llama3.encode("\n\n", bos=False, eos=False)]
        expected = [special["<|begin_of_text|>"], *head, *llama3.encode(last["content"], bos=False, eos=False)]
        expected += [
            special["<|eot_id|>"],
            special["<|start_header_id|>"],
            *llama3.encode("assistant", bos=False, eos=False),
        ]
        expected += [special["<|end_header_id|>"], *llama3.encode("\n\n", bos=False, eos=False)]
        assert formatter.encode_dialog_prompt([last]) == expected


def test_several_python_list_calls_share_one_list(family):
    name, formatter, _, _ = family
    message = assistant(WEATHER, call("get_time", zone="CET"))
    tokens = formatter.encode_message(message, "python_list")
    text = formatter.tokenizer.decode(tokens[len(formatter._header("assistant")) : -1])
    assert text == '[get_weather(city="Paris", unit="celsius", days=3), get_time(zone="CET")]'
    decoded = formatter.decode_assistant_message(tokens[len(formatter._header("assistant")) :], "out_of_tokens")
    assert [(c["tool_name"], c["arguments"]) for c in decoded["tool_calls"]] == [
        ("get_weather", WEATHER["arguments"]),
        ("get_time", {"zone": "CET"}),
    ]


def test_python_list_values_llama_models_writes_unparsably_are_written_as_python(family):
    # llama-models writes "it"s" and {k=v}: neither it nor Python can read them back. Here they are valid
    # Python literals with the same values; whatever it writes validly (tested above) is written the same.
    _, formatter, _, _ = family
    arguments = {"quote": 'say "hi"', "path": "C:\\dir", "line": "a\nb", "nested": {"k": [1, {"x": None}]}}
    tokens = formatter.encode_message(assistant(call("f", **arguments)), "python_list")
    text = formatter.tokenizer.decode(tokens[len(formatter._header("assistant")) : -1])
    body = ast.parse(text, mode="eval").body.elts[0]
    assert {k.arg: ast.literal_eval(k.value) for k in body.keywords} == arguments


def test_llama4_code_sits_between_python_start_and_end_where_llama_models_parser_finds_it(family):
    name, formatter, datatypes, witness = family
    if name != "llama4":
        pytest.skip("Llama 4 only")
    code = "import math\nprint(math.pi)\n"
    message = assistant(call("code_interpreter", code=code))
    ours = formatter.encode_message(message)
    header, special = formatter._header("assistant"), formatter.tokenizer.special_tokens
    meta_code = meta_tokens(name, witness, datatypes, [message], "json")[1 + len(header) : -len(header)]
    assert meta_code == formatter.tokenizer.encode(code, bos=False, eos=False) + [special["<|eom|>"]]
    assert ours == [
        *header,
        special["<|python_start|>"],
        *meta_code[:-1],
        special["<|python_end|>"],
        special["<|eom|>"],
    ]
    # llama-models' own parser reads the code back from these tokens, not from its encoder's.
    meta_reply = plain_message(witness.decode_assistant_message(ours[len(header) :], datatypes.StopReason.end_of_turn))
    assert meta_reply["tool_calls"] == [{"tool_name": "code_interpreter", "arguments": {"code": code}}]


# -- Encoding: ids written from Meta's prompt_format.md ---------------------------------------------------------


def test_llama31_tool_messages_have_the_tokens_of_metas_prompt_format_doc(llama3):
    """llama3_1/prompt_format.md: a code_interpreter call is <|python_tag|>code<|eom_id|>; a function
    call in the <function> format ends with <|eot_id|>; a tool's result is an ipython message."""
    formatter, enc = ChatFormat(llama3), lambda s: llama3.encode(s, bos=False, eos=False)
    start, end, eom, eot, python_tag = 128006, 128007, 128008, 128009, 128010
    code = "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"
    assert formatter.encode_message(assistant(call("code_interpreter", code=code))) == [
        start, *enc("assistant"), end, *enc("\n\n"), python_tag, *enc(code), eom,
    ]  # fmt: skip
    songs = assistant(call("trending_songs", n=10), stop="end_of_turn")
    assert formatter.encode_message(songs, "function_tag") == [
        start, *enc("assistant"), end, *enc("\n\n"), *enc('<function=trending_songs>{"n": 10}</function>'), eot,
    ]  # fmt: skip
    assert formatter.encode_message(msg("ipython", '{"result": 7}')) == [
        start, *enc("ipython"), end, *enc("\n\n"), *enc('{"result": 7}'), eot,
    ]  # fmt: skip


def test_llama4_messages_have_llama4_headers_and_end_tokens(llama4):
    # <|begin_of_text|> 200000, <|header_start|> 200005, <|header_end|> 200006, <|eom|> 200007, <|eot|> 200008.
    formatter, enc = ChatFormat(llama4), lambda s: llama4.encode(s, bos=False, eos=False)
    assert formatter.style == "llama4"
    header = lambda role: [200005, *enc(role), 200006, *enc("\n\n")]  # noqa: E731
    assert formatter.encode_dialog_prompt([msg("user", "Hi")]) == [
        200000,
        *header("user"),
        *enc("Hi"),
        200008,
        *header("assistant"),
    ]
    # Llama 4 ends a call and a tool's result with <|eom|>, and keeps content unstripped.
    assert formatter.encode_message(assistant(WEATHER, stop="end_of_turn"), "python_list")[-1] == 200007
    assert formatter.encode_message(msg("tool", " 21 ")) == [*header("ipython"), *enc(" 21 "), 200007]


# -- Decoding ------------------------------------------------------------------------------------------------------

# (python tag first, the reply's text, its stop token): decoded as llama-models decodes them.
AS_LLAMA_MODELS = {
    "plain text": (False, "Hello! How can I help?", "eot"),
    "plain text keeps its trailing newline": (False, "Line one.\n\nLine two.\n", "eot"),
    "spaces at the ends, out of tokens": (False, "  spaced out  ", None),
    "plain text waiting for a tool": (False, "Let me check.", "eom"),
    "an empty reply": (False, "", "eot"),
    "brave_search": (True, 'brave_search.call(query="latest price of 1oz gold")', "eom"),
    "wolfram_alpha without the tag": (False, 'wolfram_alpha.call(query="100th decimal of pi")', "eom"),
    "photogen": (True, 'photogen.call(query="a llama")', "eom"),
    "any name.call(query=...) is a built-in call": (False, 'my_tool.call(query="x")', "eom"),
    "a built-in call after text": (False, 'Sure, searching now: brave_search.call(query="Paris")', "eom"),
    "a built-in call with an empty query": (True, 'brave_search.call(query="")', "eom"),
    "code after the tag": (True, "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))", "eom"),
    "code cut off, out of tokens": (True, "for i in range(10):\n    print(", None),
    "code ending the turn": (True, "print('hi')", "eot"),
    "a JSON call": (False, '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', "eom"),
    "a JSON call after the tag, pretty-printed": (
        True,
        '{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
        '        "genre": "all"\n    }\n}',
        "eom",
    ),
    "a JSON call with only a name and parameters": (False, '{"name": "f", "parameters": {"a": [1, 2]}}', "eot"),
    "JSON with unicode arguments": (False, '{"name": "translate", "parameters": {"text": "東京 🦙"}}', "eot"),
    "JSON with escaped unicode": (False, '{"name": "t", "parameters": {"text": "\\u00e9\\ud83e\\udd99"}}', "eot"),
    "special-token text in JSON arguments": (False, '{"name": "f", "parameters": {"s": "<|eot_id|><|eom|>"}}', "eot"),
    "a JSON object that is not a call": (False, '{"answer": 42}', "eot"),
    "a JSON list": (False, '[{"name": "f"}]', "eot"),
    "malformed JSON": (False, '{"name": "f", "parameters": {"a": 1}', "eot"),
    "a JSON call cut off": (False, '{"type": "function", "name": "get_weather", "parameters": {"ci', None),
    "a function tag": (False, '<function=trending_songs>{"n": 10}</function>', "eot"),
    "a function tag without its closing tag": (False, '<function=get_weather>{"city": "Paris"}', "eot"),
    "a function tag after text": (False, 'OK. <function=get_time>{"zone": "CET"}</function>', "eot"),
    "single-quoted function-tag arguments": (False, "<function=f>{'k': 'v', 'n': '1'}</function>", "eot"),
    "a built-in called as a function": (False, '<function=brave_search>{"query": "gold"}</function>', "eom"),
    "a built-in called as JSON": (False, '{"name": "wolfram_alpha", "parameters": {"query": "2+2"}}', "eom"),
    "a python list call": (False, '[get_boiling_point(liquid_name="water", celsius=True)]', "eot"),
    "a python list call with numbers and None": (False, "[f(a=1.5, b=-2, c=None, d=[1, 'x'])]", "eot"),
    "a python list call with a unicode name": (False, '[天気(city="東京")]', "eot"),
    "a python list of non-calls": (False, "[1, 2, 3]", "eot"),
    "an empty python list": (False, "[]", "eot"),
    "a python call with positional arguments": (False, '[get_weather("Paris")]', "eot"),
    "a bare call, not in a list": (False, 'get_weather(city="Paris")', "eot"),
    "a call-like sentence": (False, "I would call get_weather(city=Paris) for that.", "eot"),
    "a function tag in prose without arguments": (False, "Use <function=name> tags.", "eot"),
}


def reply_tokens(formatter, python_tag, text, stop):
    ids = [formatter.python_id] if python_tag else []
    ids += formatter.tokenizer.encode(text, bos=False, eos=False)
    return ids + ([] if stop is None else [formatter.eot_id if stop == "eot" else formatter.eom_id])


def decoded(formatter, tokens, stop_reason="out_of_tokens"):
    message = formatter.decode_assistant_message(tokens, stop_reason)
    for c in message["tool_calls"]:
        assert isinstance(c.pop("call_id"), str)
    return message


@pytest.mark.parametrize("case", AS_LLAMA_MODELS)
def test_replies_decode_as_llama_models_decodes_them(family, case):
    name, formatter, datatypes, witness = family
    tokens = reply_tokens(formatter, *AS_LLAMA_MODELS[case])
    expected = plain_message(witness.decode_assistant_message(tokens, datatypes.StopReason.out_of_tokens))
    assert decoded(formatter, tokens) == expected


def text_reply(content, stop_reason):
    return {"role": "assistant", "content": content, "stop_reason": stop_reason, "tool_calls": []}


def calls_reply(stop_reason, *calls):
    return {
        "role": "assistant",
        "content": "",
        "stop_reason": stop_reason,
        "tool_calls": [{"tool_name": n, "arguments": a} for n, a in calls],
    }


# Where llama-models is wrong (it raises, drops calls or breaks values): what is right, by hand.
RIGHT_WHERE_LLAMA_MODELS_IS_NOT = {
    "a python list of several calls gives them all": (
        (False, '[get_weather(city="Paris"), get_time(zone="CET")]', "eot"),
        calls_reply("end_of_turn", ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})),
    ),
    "a JSON call without parameters has none (llama-models: KeyError)": (
        (False, '{"type": "function", "name": "get_time"}', "eom"),
        calls_reply("end_of_message", ("get_time", {})),
    ),
    "an apostrophe in a function-tag value survives (llama-models: plain text)": (
        (False, '<function=say>{"text": "it\'s here"}</function>', "eot"),
        calls_reply("end_of_turn", ("say", {"text": "it's here"})),
    ),
    "a single-quoted function-tag value holding a double quote": (
        (False, "<function=say>{'text': 'a \"b\"'}</function>", "eot"),
        calls_reply("end_of_turn", ("say", {"text": 'a "b"'})),
    ),
    "nested function-tag arguments (llama-models stops at the first })": (
        (False, '<function=f>{"a": {"b": [1, {"c": "}"}]}}</function>', "eot"),
        calls_reply("end_of_turn", ("f", {"a": {"b": [1, {"c": "}"}]}})),
    ),
    "several function tags give every call": (
        (False, '<function=f>{"a": 1}</function><function=g>{}</function>', "eot"),
        calls_reply("end_of_turn", ("f", {"a": 1}), ("g", {})),
    ),
    "several JSON calls one after another give every call": (
        (False, '{"name": "f", "parameters": {"a": 1}}{"name": "g", "parameters": {}}', "eom"),
        calls_reply("end_of_message", ("f", {"a": 1}), ("g", {})),
    ),
    "a JSON call without a name is plain text (llama-models: KeyError)": (
        (False, '{"type": "function", "parameters": {"a": 1}}', "eot"),
        text_reply('{"type": "function", "parameters": {"a": 1}}', "end_of_turn"),
    ),
    "a JSON call whose name is not a str is plain text (llama-models: a pydantic error)": (
        (False, '{"name": 3, "parameters": {}}', "eot"),
        text_reply('{"name": 3, "parameters": {}}', "end_of_turn"),
    ),
    "a python call with a variable as argument is plain text (llama-models: ValueError)": (
        (False, "[f(x=y)]", "eot"),
        text_reply("[f(x=y)]", "end_of_turn"),
    ),
    "a python call with **kwargs is plain text (llama-models: ValueError)": (
        (False, "[f(**kw)]", "eot"),
        text_reply("[f(**kw)]", "end_of_turn"),
    ),
    "a built-in called as a function without arguments (llama-models: IndexError)": (
        (False, "<function=brave_search>{}</function>", "eom"),
        calls_reply("end_of_message", ("brave_search", {})),
    ),
    "a built-in query holding quotes, ending the reply (llama-models: plain text)": (
        (True, 'brave_search.call(query="the film "Up" cast")', "eom"),
        calls_reply("end_of_message", ("brave_search", {"query": 'the film "Up" cast'})),
    ),
    "deeply nested JSON is plain text (llama-models: RecursionError)": (
        (False, '{"a":' * 100_000, None),
        text_reply('{"a":' * 100_000, "out_of_tokens"),
    ),
    "special-token text at the end is text, not a stop": (
        (False, "Done.<|eot_id|>", None),
        text_reply("Done.<|eot_id|>", "out_of_tokens"),
    ),
}


@pytest.mark.parametrize("case", RIGHT_WHERE_LLAMA_MODELS_IS_NOT)
def test_replies_llama_models_gets_wrong_decode_right(family, case):
    _, formatter, _, _ = family
    reply, expected = RIGHT_WHERE_LLAMA_MODELS_IS_NOT[case]
    assert decoded(formatter, reply_tokens(formatter, *reply)) == expected


def test_decoding_takes_metas_header_eos_and_special_token_ids(family):
    _, formatter, _, _ = family
    tokenizer, header = formatter.tokenizer, formatter._header("assistant")
    text = tokenizer.encode('{"name": "f", "parameters": {"s": "', bos=False, eos=False)
    # A stop token's id inside the arguments is text there; only the last token is the stop.
    tokens = header + text + [formatter.eot_id] + tokenizer.encode('"}}', bos=False, eos=False) + [formatter.eom_id]
    stop_text = tokenizer.decode([formatter.eot_id])
    assert decoded(formatter, tokens) == calls_reply("end_of_message", ("f", {"s": stop_text}))
    assert decoded(formatter, tokenizer.encode("Bye", bos=False, eos=True)) == text_reply("Bye", "end_of_turn")
    assert decoded(formatter, [], "end_of_message") == text_reply("", "end_of_message")


BOUNDARY = ["<function=", "{", "}", "[", "]", "(", ")", '"', "'", "=", ",", ".call(query=", "brave_search", "\n"]


@pytest.mark.parametrize("name", ["llama3", "llama4"])
def test_decoding_any_tokens_never_raises(name, request):
    tokenizer = request.getfixturevalue(name)
    formatter = ChatFormat(tokenizer)
    specials = [formatter.python_id, formatter.eot_id, formatter.eom_id, tokenizer.eos_id]
    pieces = st.one_of(
        st.sampled_from(BOUNDARY).map(lambda s: tokenizer.encode(s, bos=False, eos=False)),
        st.text(max_size=8).map(lambda s: tokenizer.encode(s, bos=False, eos=False)),
        st.lists(st.integers(0, tokenizer.n_words - 1), max_size=3),
        st.sampled_from(specials).map(lambda t: [t]),
    )

    @SETTINGS
    @given(tokens=st.lists(pieces, max_size=30).map(lambda ps: [t for p in ps for t in p]))
    def check(tokens):
        message = formatter.decode_assistant_message(tokens, "out_of_tokens")
        assert isinstance(message["content"], str) and message["stop_reason"] in (
            "end_of_turn",
            "end_of_message",
            "out_of_tokens",
        )
        assert all(isinstance(c["arguments"], dict) and c["tool_name"] for c in message["tool_calls"])

    check()


# -- Round trip: encode a random call, decode the reply, get the call back ---------------------------------------

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s) and s not in ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
)
strings = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(["<|eot_id|>", "<|eom|>", "<|python_tag|>", "it's", 'say "hi"', "}", "</function>", "\\"]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False), strings
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3), max_leaves=8
)
custom_calls = st.builds(
    lambda name, arguments: {"call_id": "x", "tool_name": name, "arguments": arguments},
    identifiers,
    st.dictionaries(identifiers, values, max_size=4),
)
builtin_calls = st.one_of(
    st.builds(
        lambda name, query: {"call_id": "x", "tool_name": name, "arguments": {"query": query}},
        st.sampled_from(["brave_search", "wolfram_alpha", "photogen"]),
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters='"'), max_size=30),
    ),
    st.builds(
        lambda code: {"call_id": "x", "tool_name": "code_interpreter", "arguments": {"code": code}},
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    ),
)


def looks_like_another_call(code):
    """Code that llama-models' order of trial reads as another kind of call first."""
    stripped = code.strip(" \t\n\r")
    return stripped.startswith(("{", "[")) or ".call(query=" in code or "<function=" in code


@pytest.mark.parametrize("name", ["llama3", "llama4"])
def test_random_tool_calls_round_trip(name, request):
    formatter = ChatFormat(request.getfixturevalue(name))
    header = formatter._header("assistant")

    @SETTINGS
    @given(
        calls=st.lists(custom_calls, min_size=1, max_size=3) | builtin_calls.map(lambda c: [c]),
        fmt=st.sampled_from(FORMATS),
        stop=st.sampled_from(["end_of_message", "end_of_turn"]),
    )
    def check(calls, fmt, stop):
        if calls[0]["tool_name"] == "code_interpreter":
            assume(not looks_like_another_call(calls[0]["arguments"]["code"]))
        message = {"role": "assistant", "content": "", "tool_calls": calls, "stop_reason": stop}
        tokens = formatter.encode_message(message, fmt)
        assert tokens[: len(header)] == header
        reply = decoded(formatter, tokens[len(header) :])
        expected_stop = "end_of_message" if stop == "end_of_message" or name == "llama4" else "end_of_turn"
        assert reply["stop_reason"] == expected_stop and reply["content"] == ""
        assert reply["tool_calls"] == [{"tool_name": c["tool_name"], "arguments": c["arguments"]} for c in calls]

    check()


# -- Bad input -----------------------------------------------------------------------------------------------------

BAD_MESSAGES = {
    "tool_calls not a list": (msg("assistant", "", tool_calls={"tool_name": "f"}), "tool_calls is a list"),
    "a call that is not a dict": (msg("assistant", "", tool_calls=["f()"]), "tool call 0 is a str"),
    "a call without a name": (msg("assistant", "", tool_calls=[{"arguments": {}}]), "tool_name None"),
    "arguments not a dict": (msg("assistant", "", tool_calls=[{"tool_name": "f", "arguments": "{}"}]), "arguments"),
    "brave_search without a query": (msg("assistant", "", tool_calls=[call("brave_search", q="x")]), "'query'"),
    "code_interpreter without code": (msg("assistant", "", tool_calls=[call("code_interpreter", query="x")]), "'code'"),
    "tool calls from the user": (msg("user", "hi", tool_calls=[WEATHER]), "only assistant messages"),
    "an unknown stop reason": (msg("assistant", "x", stop_reason="done"), "stop_reason is 'done'"),
    "a call_id that is not a str": (msg("assistant", "", tool_calls=[dict(WEATHER, call_id=3)]), "call_id"),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_a_malformed_tool_message_is_a_value_error_saying_what_is_wrong(llama3, case):
    message, match = BAD_MESSAGES[case]
    formatter = ChatFormat(llama3)
    with pytest.raises(ValueError, match=match):
        formatter.encode_message(message)
    with pytest.raises(ValueError, match=match):
        formatter.encode_dialog_prompt([USER, message])


def test_bad_formats_and_arguments_are_value_errors(llama3):
    formatter = ChatFormat(llama3)
    with pytest.raises(ValueError, match="tool_prompt_format is 'xml'.*'json', 'function_tag', 'python_list'"):
        formatter.encode_dialog_prompt([USER], "xml")
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        formatter.encode_message(assistant(call("f", s={1, 2})), "json")
    with pytest.raises(ValueError, match="python_list takes"):
        formatter.encode_message(assistant(call("f", s={1, 2})), "python_list")
    with pytest.raises(ValueError, match="finite"):
        formatter.encode_message(assistant(call("f", x=float("inf"))), "python_list")
    with pytest.raises(ValueError, match="stop_reason is 'eot'"):
        formatter.decode_assistant_message([1, 2], "eot")


def test_llama2_refuses_tool_calls(llama2):
    with pytest.raises(ValueError, match="Llama 2's chat format has no tool calls"):
        ChatFormat(llama2).encode_dialog_prompt([USER, assistant(WEATHER), msg("user", "ok")])


def test_llama_models_enums_are_taken(family):
    name, formatter, datatypes, _ = family
    message = assistant(dict(WEATHER, tool_name=datatypes.BuiltinTool.brave_search, arguments={"query": "x"}))
    message["stop_reason"] = datatypes.StopReason.end_of_message
    plain = assistant(call("brave_search", query="x"))
    assert formatter.encode_message(message, datatypes.ToolPromptFormat.json) == formatter.encode_message(plain)
    assert decoded(formatter, [], datatypes.StopReason.end_of_turn) == text_reply("", "end_of_turn")


# -- chat_completion and chat_completion_stream ---------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for a Transformer: whatever the input, each sequence continues its prompt with its script."""

    def __init__(self, scripts, prompt_lens, vocab_size, max_seq_len=256):
        super().__init__()
        self.params = types.SimpleNamespace(max_seq_len=max_seq_len, max_batch_size=4, vocab_size=vocab_size)
        self.tok_embeddings = torch.nn.Embedding(1, 1)  # where generation reads the device from
        self.scripts, self.prompt_lens, self.filler = scripts, prompt_lens, ord("x")

    def forward(self, tokens, start_pos, last_only=False):
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, seqlen, self.params.vocab_size)
        for i in range(bsz):
            for j in range(seqlen):  # the output at position p predicts the token at p + 1
                k = start_pos + j + 1 - self.prompt_lens[i]
                script = self.scripts[i]
                logits[i, j, script[k] if 0 <= k < len(script) else self.filler] = 1.0
        return logits[:, -1:] if last_only else logits


def test_chat_completion_returns_tool_calls_and_stop_reasons(byte_path):
    tokenizer = Tokenizer(byte_path)  # ids are bytes; <|eom_id|> 264, <|eot_id|> 265, <|python_tag|> 266
    special = tokenizer.special_tokens
    eom, eot, python_tag = special["<|eom_id|>"], special["<|eot_id|>"], special["<|python_tag|>"]
    dialogs = [[msg("user", "Weather in Paris?")], [msg("user", "Run code")], [msg("user", "Hi")], [USER]]
    scripts = [
        list(b'{"name": "get_weather", "parameters": {"city": "Paris"}}') + [eom],
        [python_tag, *b"print(1)", eom],
        list(b"Hello there!\n") + [eot],
        list(b"x" * 100),
    ]
    prompts = [ChatFormat(tokenizer).encode_dialog_prompt(d) for d in dialogs]
    llama = Llama(ScriptedModel(scripts, [len(p) for p in prompts], tokenizer.n_words), tokenizer)
    results = llama.chat_completion(dialogs, max_gen_len=60, temperature=0)
    generations = [r["generation"] for r in results]
    for g in generations:
        for c in g.get("tool_calls", []):
            assert isinstance(c.pop("call_id"), str)
    assert generations == [
        calls_reply("end_of_message", ("get_weather", {"city": "Paris"})),
        calls_reply("end_of_message", ("code_interpreter", {"code": "print(1)"})),
        {"role": "assistant", "content": "Hello there!\n", "stop_reason": "end_of_turn"},
        {"role": "assistant", "content": "x" * 60, "stop_reason": "out_of_tokens"},
    ]
    for i in range(3):  # one dialog at a time, streamed: the pieces are the raw reply, then the message
        llama.model.prompt_lens, llama.model.scripts = [len(prompts[i])], [scripts[i]]
        stream = llama.chat_completion_stream(dialogs[i], max_gen_len=60, temperature=0)
        assert stream.message is None
        assert "".join(stream) == tokenizer.decode(scripts[i][:-1])
        for c in stream.message.get("tool_calls", []):
            c.pop("call_id")
        assert stream.message == generations[i]


def test_chat_completion_needs_a_message_the_assistant_can_answer_last(byte_path):
    tokenizer = Tokenizer(byte_path)
    llama = Llama(ScriptedModel([[]], [1], tokenizer.n_words), tokenizer)
    for last in (msg("assistant", "Sure"), msg("system", "Be brief."), assistant(WEATHER)):
        with pytest.raises(ValueError, match=r"dialogs\[0\] is malformed: its last message is from .*user.*ipython"):
            llama.chat_completion([[USER, last]])
        with pytest.raises(ValueError, match="last message"):
            llama.chat_completion_stream([USER, last])
    with pytest.raises(ValueError, match=r"dialogs\[0\] is malformed: tool_prompt_format"):
        llama.chat_completion([[USER]], tool_prompt_format="yaml")
