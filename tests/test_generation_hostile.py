"""Hostile input to generation: every bad argument is a ValueError that names it, raised before the KV
cache is touched; property tests over prompts, dialogs and sampling arguments; the context's limits."""

import math

import pytest
import torch
from generation_helpers import (
    build,
    llama2_tokenizer_path,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    plain_greedy,
    write_tiny,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llama.generation import UNSAFE_ERROR
from llama.sampling import token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_SEQ_LEN, MAX_BATCH_SIZE, VOCAB = 32, 3, 512  # the byte tokenizer: 256 bytes + 256 special tokens
PROBE = [[300, 65, 66, 67], [300, 72]]  # a greedy call whose result shows whether the object still works


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), dim=32, n_heads=2, n_kv_heads=1, n_layers=1)


@pytest.fixture(scope="module")
def llama(ckpt):
    return build(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)


@pytest.fixture(scope="module")
def fresh_probe(ckpt):
    """The probe's result on a fresh object, and with log-probabilities (which read the whole cache)."""
    fresh = build(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)
    return probe(fresh)


def probe(llama):
    return llama.generate(PROBE, max_gen_len=6, temperature=0, logprobs=True)


def assert_still_works(llama, fresh_probe):
    tokens, logprobs = probe(llama)
    assert tokens == fresh_probe[0]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(fresh_probe[1]), atol=1e-5, rtol=1e-5)


def msg(role, content):
    return {"role": role, "content": content}


TOO_LONG = "x" * MAX_SEQ_LEN  # with BOS: one token more than the context holds

BAD_CALLS = {
    # generate
    "no prompts": (lambda m: m.generate([], 4), "prompt_tokens is empty"),
    "an empty prompt": (lambda m: m.generate([[1], []], 4), r"prompt_tokens\[1\] is empty"),
    "a prompt past max_seq_len": (
        lambda m: m.generate([[1] * (MAX_SEQ_LEN + 1)], 4),
        r"prompt_tokens\[0\].*max_seq_len",
    ),
    "more prompts than max_batch_size": (lambda m: m.generate([[1]] * 4, 4), "max_batch_size"),
    "a token id past the vocabulary": (lambda m: m.generate([[1, VOCAB]], 4), r"prompt_tokens\[0\].*vocabulary"),
    "a negative token id": (lambda m: m.generate([[1], [-1]], 4), r"prompt_tokens\[1\].*vocabulary"),
    "a float token": (lambda m: m.generate([[1, 2.0]], 4), r"prompt_tokens\[0\].*token id"),
    "a str token": (lambda m: m.generate([[1, "a"]], 4), r"prompt_tokens\[0\].*token id"),
    "a bool token": (lambda m: m.generate([[True]], 4), r"prompt_tokens\[0\].*token id"),
    "a str instead of token lists": (lambda m: m.generate("hello", 4), "prompt_tokens must be a list"),
    "a flat token list": (lambda m: m.generate([1, 2, 3], 4), r"prompt_tokens\[0\] must be a list"),
    "max_gen_len 0": (lambda m: m.generate([[1]], 0), "max_gen_len"),
    "max_gen_len negative": (lambda m: m.generate([[1]], -5), "max_gen_len"),
    "max_gen_len a float": (lambda m: m.generate([[1]], 2.5), "max_gen_len"),
    "a prompt of max_seq_len without echo": (
        lambda m: m.generate([[1] * MAX_SEQ_LEN], 4),
        r"prompt_tokens\[0\].*no room to generate",
    ),
    "a text prompt of max_seq_len": (lambda m: m.text_completion(["y" * (MAX_SEQ_LEN - 1)]), "no room to generate"),
    "negative temperature": (lambda m: m.generate([[1]], 4, temperature=-0.1), "temperature"),
    "nan temperature": (lambda m: m.generate([[1]], 4, temperature=math.nan), "temperature"),
    "infinite temperature": (lambda m: m.generate([[1]], 4, temperature=math.inf), "temperature"),
    "str temperature": (lambda m: m.generate([[1]], 4, temperature="0.5"), "temperature"),
    "top_p 0": (lambda m: m.generate([[1]], 4, top_p=0), "top_p"),
    "top_p above 1": (lambda m: m.generate([[1]], 4, top_p=1.01), "top_p"),
    "nan top_p": (lambda m: m.generate([[1]], 4, top_p=math.nan), "top_p"),
    "top_p None": (lambda m: m.generate([[1]], 4, top_p=None), "top_p"),
    "bad stream arguments": (lambda m: m.generate_stream([[1]], 4, temperature=-1), "temperature"),
    # text_completion
    "no text prompts": (lambda m: m.text_completion([]), "prompts is empty"),
    "a str instead of a list": (lambda m: m.text_completion("hello"), "prompts must be a list"),
    "an empty text prompt": (lambda m: m.text_completion(["hi", ""]), r"prompts\[1\] is empty"),
    "a non-str prompt": (lambda m: m.text_completion([b"hi"]), r"prompts\[0\] must be a string"),
    "a text prompt past max_seq_len": (lambda m: m.text_completion([TOO_LONG]), r"prompts\[0\].*max_seq_len"),
    "too many text prompts": (lambda m: m.text_completion(["a"] * 4), "max_batch_size"),
    "text max_gen_len 0": (lambda m: m.text_completion(["a"], max_gen_len=0), "max_gen_len"),
    "text top_p": (lambda m: m.text_completion(["a"], top_p=2), "top_p"),
    "an empty stream prompt": (lambda m: m.text_completion_stream(""), "prompt is empty"),
    "a stream prompt past max_seq_len": (lambda m: m.text_completion_stream(TOO_LONG), "prompt.*max_seq_len"),
    # chat_completion
    "no dialogs": (lambda m: m.chat_completion([]), "dialogs is empty"),
    "a dialog instead of a list of dialogs": (lambda m: m.chat_completion([msg("user", "hi")]), r"dialogs\[0\]"),
    "an empty dialog": (lambda m: m.chat_completion([[msg("user", "hi")], []]), r"dialogs\[1\] is empty"),
    "a message without content": (lambda m: m.chat_completion([[{"role": "user"}]]), r"dialogs\[0\]\[0\]"),
    "a message without role": (lambda m: m.chat_completion([[{"content": "hi"}]]), r"dialogs\[0\]\[0\]"),
    "a str message": (lambda m: m.chat_completion([["hi"]]), r"dialogs\[0\]\[0\]"),
    "content not a str": (lambda m: m.chat_completion([[msg("user", 3)]]), r"dialogs\[0\]\[0\]\['content'\]"),
    "a dialog past max_seq_len": (lambda m: m.chat_completion([[msg("user", TOO_LONG)]]), "dialogs.*max_seq_len"),
    "too many dialogs": (lambda m: m.chat_completion([[msg("user", "a")]] * 4), "max_batch_size"),
    "chat temperature": (lambda m: m.chat_completion([[msg("user", "a")]], temperature=-2), "temperature"),
    "a stream dialog past max_seq_len": (lambda m: m.chat_completion_stream([msg("user", TOO_LONG)]), "dialog"),
    "an empty stream dialog": (lambda m: m.chat_completion_stream([]), "dialog is empty"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_each_bad_input_is_a_value_error_and_the_object_still_works(case, llama, fresh_probe):
    call, match = BAD_CALLS[case]
    probe(llama)  # the cache holds a previous call's state, as it would in a service
    with pytest.raises(ValueError, match=match):
        call(llama)
    assert_still_works(llama, fresh_probe)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    path = llama2_tokenizer_path()
    if path is None:
        pytest.skip("mistral-common (a Llama 2-style SentencePiece tokenizer.model) is not installed")
    folder = write_tiny(tmp_path_factory.mktemp("tiny2"), tokenizer=path, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    return build(folder, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)


LLAMA2_BAD_DIALOGS = {
    "two user turns in a row": [msg("user", "a"), msg("user", "b")],
    "ending with the assistant": [msg("user", "a"), msg("assistant", "b")],
    "only a system message": [msg("system", "be brief")],
    "a role Llama 2 has not": [msg("ipython", "{}")],
    "malformed and with a tag": [msg("user", "[INST] a"), msg("user", "b")],
}


@pytest.mark.parametrize("case", LLAMA2_BAD_DIALOGS)
def test_llama2_dialogs_that_break_its_format_are_value_errors(case, llama2):
    good = [msg("user", "hello")]
    with pytest.raises(ValueError, match=r"dialogs\[1\] is malformed"):
        llama2.chat_completion([good, LLAMA2_BAD_DIALOGS[case]], max_gen_len=4)
    with pytest.raises(ValueError, match="dialog is malformed"):
        llama2.chat_completion_stream(LLAMA2_BAD_DIALOGS[case])
    # A refused dialog costs nothing and is not checked against max_seq_len; the others still are.
    long_tagged = [msg("user", "<<SYS>> " + "word " * MAX_SEQ_LEN)]
    results = llama2.chat_completion([good, long_tagged], max_gen_len=4, temperature=0)
    assert results[1]["generation"]["content"] == UNSAFE_ERROR
    with pytest.raises(ValueError, match=r"dialogs\[0\].*max_seq_len"):
        llama2.chat_completion([[msg("user", "word " * MAX_SEQ_LEN)], good])


# -- Property tests: valid arguments give well-formed results; one bad argument gives a ValueError naming it --
# Each example draws valid arguments, then maybe replaces one of them with a bad value, so that both the
# generating path and every error path are exercised (arguments drawn all at random are nearly always bad).

not_numbers = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.binary(max_size=3), st.lists(st.integers(), max_size=2)
)
# Any unicode, lone surrogates included, and strings the chat formats give a meaning to; short enough to fit.
texts = st.one_of(
    st.text(st.characters(exclude_categories=()), min_size=1, max_size=6),
    st.sampled_from(["<|eot_id|>", "<|begin_of_text|>", "[INST]", "<</SYS>>", "\x00", "é🦙", "\ufffd"]),
)
valid_prompt_tokens = st.lists(  # a prompt of MAX_SEQ_LEN leaves no room to generate: valid only with echo
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_SEQ_LEN - 1), min_size=1, max_size=MAX_BATCH_SIZE
)
bad_tokens = st.one_of(st.integers(VOCAB, 2**70), st.integers(max_value=-1), st.floats(), not_numbers)
VALID = {
    "prompt_tokens": valid_prompt_tokens,
    "prompts": st.lists(texts, min_size=1, max_size=MAX_BATCH_SIZE),
    "prompt": texts,
    "max_gen_len": st.one_of(st.integers(1, 40), st.integers(41, 10**12)),
    "temperature": st.one_of(st.just(0), st.floats(0, 2), st.floats(1e-30, 1e-3)),
    "top_p": st.one_of(st.just(1), st.floats(1e-9, 1)),
}
INVALID = {
    "prompt_tokens": st.one_of(
        st.just([]),
        st.lists(st.lists(st.integers(0, 9), min_size=1), min_size=MAX_BATCH_SIZE + 1, max_size=MAX_BATCH_SIZE + 2),
        valid_prompt_tokens.map(lambda ps: ps + [[]]),
        st.tuples(valid_prompt_tokens, bad_tokens).map(lambda x: x[0][:-1] + [x[0][-1] + [x[1]]]),
        valid_prompt_tokens.map(lambda ps: ps[:-1] + [ps[-1] * (MAX_SEQ_LEN + 1)]),
        st.one_of(not_numbers, st.integers(), st.text()),
    ),
    "prompts": st.one_of(
        st.just([]),
        st.lists(texts, min_size=MAX_BATCH_SIZE + 1, max_size=MAX_BATCH_SIZE + 2),
        st.lists(texts, max_size=2).map(lambda ps: ps + [""]),
        st.tuples(st.lists(texts, max_size=2), st.one_of(st.integers(), st.binary(), st.none())).map(
            lambda x: x[0] + [x[1]]
        ),
        st.text(min_size=MAX_SEQ_LEN, max_size=MAX_SEQ_LEN + 5).map(lambda t: [t]),
        st.one_of(st.none(), st.integers(), st.text()),
    ),
    "prompt": st.one_of(st.just(""), st.text(min_size=MAX_SEQ_LEN, max_size=MAX_SEQ_LEN + 5), st.none(), st.integers()),
    "max_gen_len": st.one_of(
        st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3), st.binary(max_size=3)
    ),
    "temperature": st.one_of(
        st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf, -math.inf]), not_numbers
    ),
    "top_p": st.one_of(
        st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(math.nan), not_numbers
    ),
}
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def draw_args(data, names):
    args = {name: data.draw(VALID[name], label=name) for name in names}
    bad = data.draw(st.sampled_from([None, None, *names]), label="bad argument")
    if bad is not None:
        args[bad] = data.draw(INVALID[bad], label=f"bad {bad}")
    event(f"bad {bad}")
    return args, bad


def call(fn, bad, **args):
    """fn(**args): a ValueError naming the bad argument if there is one, else no error."""
    if bad is None:
        return fn(**args)
    with pytest.raises(ValueError, match=bad):
        fn(**args)


def check_well_formed(llama, prompt_tokens, max_gen_len, tokens, logprobs, echo):
    assert len(tokens) == len(prompt_tokens)
    for i, (prompt, out) in enumerate(zip(prompt_tokens, tokens)):
        assert all(type(t) is int and 0 <= t < VOCAB for t in out)
        generated = out[len(prompt) :] if echo else out
        if echo:
            assert out[: len(prompt)] == list(prompt)
        assert len(generated) <= max_gen_len and len(prompt) + len(generated) <= MAX_SEQ_LEN
        assert not set(generated) & set(llama.stop_tokens)
        if logprobs is not None:
            assert len(logprobs[i]) == len(out)
            assert all(math.isfinite(lp) and lp <= 1e-6 for lp in logprobs[i])


@HYPOTHESIS
@given(data=st.data(), logprobs=st.booleans(), echo=st.booleans())
def test_generate_with_any_arguments(llama, fresh_probe, data, logprobs, echo):
    args, bad = draw_args(data, ["prompt_tokens", "max_gen_len", "temperature", "top_p"])
    result = call(llama.generate, bad, logprobs=logprobs, echo=echo, **args)
    if bad is None:
        check_well_formed(llama, args["prompt_tokens"], args["max_gen_len"], *result, echo)
    assert_still_works(llama, fresh_probe)


@HYPOTHESIS
@given(data=st.data(), stream=st.booleans())
def test_generate_stream_with_any_arguments(llama, fresh_probe, data, stream):
    args, bad = draw_args(data, ["prompt_tokens", "max_gen_len", "temperature", "top_p"])
    steps = call(llama.generate_stream, bad, **args)  # the error comes at the call, not at the first step
    if bad is None:
        tokens = [[] for _ in args["prompt_tokens"]]
        for step in steps:
            for out, new in zip(tokens, step):
                out.extend(new)
        check_well_formed(llama, args["prompt_tokens"], args["max_gen_len"], tokens, None, False)
    assert_still_works(llama, fresh_probe)


@HYPOTHESIS
@given(data=st.data(), default_len=st.booleans())
def test_text_completion_with_any_prompts(llama, fresh_probe, data, default_len):
    args, bad = draw_args(data, ["prompts", "max_gen_len", "temperature", "top_p"])
    if default_len and bad != "max_gen_len":
        args["max_gen_len"] = None
    results = call(llama.text_completion, bad, logprobs=True, **args)
    if bad is None:
        assert len(results) == len(args["prompts"])
        for r in results:
            assert isinstance(r["generation"], str) and len(r["tokens"]) == len(r["logprobs"])
    assert_still_works(llama, fresh_probe)


@HYPOTHESIS
@given(data=st.data())
def test_text_completion_stream_with_any_prompt(llama, fresh_probe, data):
    args, bad = draw_args(data, ["prompt", "max_gen_len", "temperature", "top_p"])
    pieces = call(llama.text_completion_stream, bad, **args)
    if bad is None:
        assert all(isinstance(p, str) and p for p in pieces)
    assert_still_works(llama, fresh_probe)


# Dialogs need a longer context than the text tests: every message carries a header of about 14 tokens.
CHAT_SEQ_LEN = 128
short_texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=4), st.sampled_from(["[INST]", "<|eot_id|>"])
)


def dialog_of(system, turns):
    dialog = [msg("system", system)] if system is not None else []
    for i, content in enumerate(turns):
        dialog.append(msg("user" if i % 2 == 0 else "assistant", content))
    return dialog


# [system], user, (assistant, user)*: a shape every chat format accepts.
valid_dialogs = st.builds(
    dialog_of, st.none() | short_texts, st.lists(short_texts, min_size=1, max_size=3).filter(lambda t: len(t) % 2)
)
bad_messages = st.one_of(
    st.builds(msg, st.sampled_from(["user", "system"]), st.one_of(st.integers(), st.none(), st.binary())),
    st.fixed_dictionaries({"role": st.just("user")}),
    st.fixed_dictionaries({"content": short_texts}),
    st.builds(msg, st.one_of(st.integers(), st.none()), short_texts),
    st.one_of(st.text(max_size=3), st.none(), st.integers()),
)
bad_dialogs = st.one_of(
    st.just([]),
    st.tuples(valid_dialogs, bad_messages, st.integers(0, 3)).map(lambda x: x[0][: x[2]] + [x[1]] + x[0][x[2] :]),
    st.text(min_size=CHAT_SEQ_LEN, max_size=CHAT_SEQ_LEN + 4).map(lambda t: [msg("user", t)]),
    st.one_of(st.text(max_size=3), st.none(), st.integers()),
)


@pytest.fixture(scope="module")
def chat_llama(ckpt):
    return build(ckpt, max_seq_len=CHAT_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)


@HYPOTHESIS
@given(data=st.data(), stream=st.booleans(), logprobs=st.booleans())
def test_chat_completion_with_any_dialogs(chat_llama, data, stream, logprobs):
    dialogs = data.draw(st.lists(valid_dialogs, min_size=1, max_size=MAX_BATCH_SIZE), label="dialogs")
    bad = data.draw(st.sampled_from([None, "dialogs", "batch", "max_gen_len", "temperature"]), label="bad")
    event(f"bad {bad}")
    max_gen_len, temperature = data.draw(st.none() | st.integers(1, 20)), 0.7
    if bad == "dialogs":
        dialogs[-1] = data.draw(bad_dialogs, label="bad dialog")
    elif bad == "batch":
        dialogs = data.draw(st.one_of(st.just([]), st.lists(valid_dialogs, min_size=4, max_size=5), st.text()))
    elif bad == "max_gen_len":
        max_gen_len = data.draw(INVALID["max_gen_len"], label="bad max_gen_len")
    elif bad == "temperature":
        temperature = data.draw(INVALID["temperature"], label="bad temperature")
    name = {"batch": "dialogs", None: None}.get(bad, bad)
    if stream and bad != "batch":  # the stream takes one dialog: the batch's last
        dialogs = dialogs[-1]
        pieces = call(
            chat_llama.chat_completion_stream,
            name and name.rstrip("s"),
            dialog=dialogs,
            max_gen_len=max_gen_len,
            temperature=temperature,
        )
        if bad is None:
            assert all(isinstance(p, str) and p for p in pieces)
        return
    results = call(
        chat_llama.chat_completion,
        name,
        dialogs=dialogs,
        max_gen_len=max_gen_len,
        temperature=temperature,
        logprobs=logprobs,
    )
    if bad is None:
        assert len(results) == len(dialogs)
        for r in results:
            assert r["generation"]["role"] == "assistant" and isinstance(r["generation"]["content"], str)
            assert set(r) == ({"generation", "tokens", "logprobs"} if logprobs else {"generation"})


# -- The context's limits ----------------------------------------------------------------------------------


def full_logprobs(llama, tokens):
    logits = llama.model(torch.tensor([tokens]), 0)
    return [0.0] + token_logprobs(logits[:, :-1], torch.tensor([tokens[1:]]))[0].tolist()


def test_prompts_of_max_seq_len_and_one_less(llama, fresh_probe, monkeypatch):
    monkeypatch.setattr(llama, "stop_tokens", [])
    full = [300] + [65 + i % 26 for i in range(MAX_SEQ_LEN - 1)]
    one_less = full[:-1]
    tokens, lps = llama.generate([full, one_less], max_gen_len=50, temperature=0, logprobs=True, echo=True)
    assert tokens[0] == full  # no room: nothing generated, nothing past the limit
    assert tokens[1][:-1] == one_less and len(tokens[1]) == MAX_SEQ_LEN
    assert tokens[1][-1:] == plain_greedy(llama.model, one_less, 50, [])
    for out, lp in zip(tokens, lps):
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(full_logprobs(llama, out)), atol=1e-4, rtol=1e-4)
    # Alone, a full prompt generates nothing and still gets its echo and log-probabilities.
    (alone,), (alone_lps,) = llama.generate([full], max_gen_len=1, temperature=0.8, logprobs=True, echo=True)
    assert alone == full
    torch.testing.assert_close(torch.tensor(alone_lps), torch.tensor(full_logprobs(llama, full)), atol=1e-4, rtol=1e-4)
    # With echo, a text prompt of max_seq_len tokens (BOS included) is returned as it is.
    text = "y" * (MAX_SEQ_LEN - 1)
    echoed = llama.tokenizer.decode(llama.tokenizer.encode(text, bos=True, eos=False))
    assert llama.text_completion([text], echo=True)[0]["generation"] == echoed
    assert_still_works(llama, fresh_probe)


def test_max_gen_len_past_the_context_and_a_full_batch_run_to_the_end_of_the_context(llama, monkeypatch):
    monkeypatch.setattr(llama, "stop_tokens", [])
    prompts = [[300, 65], [300] + [66] * 10, [300] + [67] * 20]
    assert len(prompts) == MAX_BATCH_SIZE
    tokens, _ = llama.generate(prompts, max_gen_len=10**9, temperature=0)
    for prompt, out in zip(prompts, tokens):
        assert len(prompt) + len(out) == MAX_SEQ_LEN
        assert out == plain_greedy(llama.model, prompt, 10**9, [])
    streamed = [[] for _ in prompts]
    for step in llama.generate_stream(prompts, max_gen_len=10**9, temperature=0):
        for out, new in zip(streamed, step):
            out.extend(new)
    assert streamed == tokens
    results = llama.text_completion(["a", "bc", "def"], max_gen_len=None, temperature=0.9)
    assert [len(r["generation"].encode("utf-8", "surrogatepass")) for r in results]  # ran without error


def test_a_short_call_after_a_long_one_gives_what_a_fresh_object_gives(ckpt, llama, monkeypatch):
    monkeypatch.setattr(llama, "stop_tokens", [])
    llama.generate([[300] + [70] * 25, [300] + [71] * 30, [300, 72]], max_gen_len=100, temperature=1.0, logprobs=True)
    short = [[300, 80], [300, 81, 82]]
    after_long = llama.generate(short, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    fresh = build(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)
    fresh.stop_tokens = []
    expected = fresh.generate(short, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert after_long[0] == expected[0]
    for got, want in zip(after_long[1], expected[1]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
