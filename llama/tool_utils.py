"""Tool calls as text: a call to the text a Llama 3.1+ / Llama 4 assistant writes for it, and a reply's text
back to calls, in llama-models' formats (built-in `name.call(query="...")`, JSON, <function=...>, python list)."""

import ast
import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal, Optional, TypedDict

ToolPromptFormat = Literal["json", "function_tag", "python_list"]
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")
# The built-in tools: those the models were trained to call by name (llama-models' BuiltinTool); the first three
# take a query, the interpreter takes code.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
BUILTIN_TOOLS = (*QUERY_TOOLS, "code_interpreter")


class ToolCall(TypedDict):
    call_id: str
    tool_name: str
    arguments: dict[str, Any]


# -- Encoding ---------------------------------------------------------------------------------------------------


def check_tool_prompt_format(tool_prompt_format: Any) -> ToolPromptFormat:
    """The format's name; llama-models' ToolPromptFormat enum is taken too."""
    value = getattr(tool_prompt_format, "value", tool_prompt_format)
    if value not in TOOL_PROMPT_FORMATS:
        raise ValueError(
            f"tool_prompt_format is {tool_prompt_format!r}: use one of {', '.join(map(repr, TOOL_PROMPT_FORMATS))}"
        )
    return value


def check_tool_call(call: Any, name: str) -> ToolCall:
    """A tool call as a dict {"call_id", "tool_name", "arguments"}, or a ValueError saying what is wrong."""
    if not isinstance(call, Mapping):
        raise ValueError(
            f"{name} is a {type(call).__name__}: a tool call is a dict "
            "{'call_id': str, 'tool_name': str, 'arguments': dict}"
        )
    tool_name = getattr(call.get("tool_name"), "value", call.get("tool_name"))  # llama-models' BuiltinTool too
    arguments = call.get("arguments")
    if not isinstance(tool_name, str) or not tool_name:
        raise ValueError(f"{name} has tool_name {tool_name!r}: give the tool's name as a non-empty str")
    if not isinstance(arguments, Mapping):
        raise ValueError(
            f"{name} has arguments of type {type(arguments).__name__}: arguments must be a dict of argument names "
            "to values ({} for none)"
        )
    if tool_name in QUERY_TOOLS and not isinstance(arguments.get("query"), str):
        raise ValueError(f"{name} calls built-in tool {tool_name!r}, which takes one argument: 'query', a str")
    if tool_name == "code_interpreter" and not isinstance(arguments.get("code"), str):
        raise ValueError(f"{name} calls built-in tool 'code_interpreter', which takes one argument: 'code', a str")
    call_id = call.get("call_id", "")
    if not isinstance(call_id, str):
        raise ValueError(f"{name} has call_id {call_id!r}: a call_id is a str")
    return {"call_id": call_id, "tool_name": tool_name, "arguments": dict(arguments)}


def encode_tool_calls(calls: list[ToolCall], tool_prompt_format: ToolPromptFormat) -> list[tuple[str, bool]]:
    """The texts of checked calls, each encoded on its own, as llama-models writes them: a built-in tool in
    its own form whatever the format (`brave_search.call(query="...")`, or the bare code for code_interpreter),
    a function in the format asked. Consecutive python_list calls share one list, [f(a=1), g(b=2)] (llama-models
    writes [f(a=1)][g(b=2)], which neither it nor Python reads as calls). Each text comes with whether it is
    code for the interpreter."""
    texts: list[tuple[str, bool]] = []
    grouped: list[str] = []  # python_list calls waiting for their list to close
    for call in calls:
        name, arguments = call["tool_name"], call["arguments"]
        if tool_prompt_format == "python_list" and name not in BUILTIN_TOOLS:
            grouped.append(f"{name}({', '.join(f'{k}={_python_value(v, name)}' for k, v in arguments.items())})")
            continue
        if grouped:
            texts.append((f"[{', '.join(grouped)}]", False))
            grouped = []
        if name in QUERY_TOOLS:
            texts.append((f'{name}.call(query="{arguments["query"]}")', False))
        elif name == "code_interpreter":
            texts.append((arguments["code"], True))
        elif tool_prompt_format == "json":
            texts.append((_json_dumps({"type": "function", "name": name, "parameters": arguments}, name), False))
        else:
            texts.append((f"<function={name}>{_json_dumps(arguments, name)}</function>", False))
    if grouped:
        texts.append((f"[{', '.join(grouped)}]", False))
    return texts


def _json_dumps(value: Any, name: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the arguments of the call to {name!r} cannot be written as JSON: {e}") from None


def _python_value(value: Any, name: str) -> str:
    """A Python literal for an argument value. llama-models writes a str as "value", which is Meta's text
    whenever that is valid Python; a str holding a quote, a backslash or a control character is escaped here
    (json.dumps's escapes are Python's), and a dict is written {"k": v}, not llama-models' unparsable {k=v}."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"an argument of the call to {name!r} is {value}: python_list takes finite numbers")
        return str(value)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_python_value(v, name) for v in value)}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python_value(k, name)}: {_python_value(v, name)}" for k, v in value.items()) + "}"
    raise ValueError(
        f"an argument of the call to {name!r} is a {type(value).__name__}: python_list takes str, int, float, bool, "
        "None, lists and dicts of them"
    )


# -- Decoding -----------------------------------------------------------------------------------------------------

# A built-in call anywhere in a reply, as llama-models finds it: any word before .call(query="...").
BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
# A query holding quotes (which the format does not escape) is read when the call ends the reply.
BUILTIN_CALL_AT_END = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>.*)"\)\s*\Z', re.DOTALL)
FUNCTION_TAG = re.compile(r"<function=(?P<name>[^}]+?)>(?={)")
# How many closing braces to try as the end of single-quoted <function=...> arguments.
MAX_BRACE_TRIES = 64
_PARSE_ERRORS = (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, AttributeError)


def parse_tool_calls(text: str, python_tag: bool) -> list[ToolCall]:
    """The tool calls a reply's text holds ([] for plain text), in llama-models' order of trial: a
    <function=...> tag, a JSON object, a python list of calls, a built-in call, and, after the python
    tag, code for the interpreter. Never raises: what does not parse is plain text."""
    try:
        calls = _custom_calls(text)
    except _PARSE_ERRORS:
        calls = None
    if calls is None:
        match = BUILTIN_CALL.search(text) or BUILTIN_CALL_AT_END.search(text)
        if match:
            calls = [(match["name"], {"query": match["query"]})]
        elif python_tag:
            calls = [("code_interpreter", {"code": text})]
        else:
            return []
    return [{"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": args} for name, args in calls]


def _custom_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    tags = list(FUNCTION_TAG.finditer(text))
    if tags:  # every <function=...> tag whose arguments parse (llama-models takes the first tag only)
        calls = [(tag["name"], _tag_arguments(text, tag.end())) for tag in tags]
        calls = [_builtin_as_custom(name, arguments) for name, arguments in calls if arguments is not None]
        return calls or None
    stripped = text.strip(" \t\n\r")  # JSON's whitespace
    if stripped.startswith("{"):
        return _json_calls(stripped)
    if stripped.startswith("["):
        return _python_list_calls(stripped)
    return None


def _tag_arguments(text: str, start: int) -> Optional[dict]:
    """The object after <function=name>: JSON, else a Python dict literal ({'k': 'v'}), else llama-models'
    last resort, the text up to the first } with every ' made a " (so {'k': true} still parses)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
        return value if isinstance(value, dict) else None
    except ValueError:
        pass
    ends = [m.start() for m in re.finditer("}", text[start:])][:MAX_BRACE_TRIES]
    for end in ends:
        try:
            value = ast.literal_eval(text[start : start + end + 1])
        except _PARSE_ERRORS:
            continue
        return value if isinstance(value, dict) else None
    if ends:
        try:
            value = json.loads(text[start : start + ends[0] + 1].replace("'", '"'))
            return value if isinstance(value, dict) else None
        except ValueError:
            return None
    return None


def _json_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    """A reply that is JSON objects (one, or several one after another, as several calls are written), each
    with a "name" (and usually "type": "function"): calls, with their "parameters", {} when there are none.
    Anything else is plain text."""
    decoder, calls, end = json.JSONDecoder(), [], 0
    while end < len(text):
        try:
            value, end = decoder.raw_decode(text, end)
        except ValueError:
            return None
        if not isinstance(value, dict) or not ("name" in value or value.get("type") == "function"):
            return None
        name, arguments = value.get("name"), value.get("parameters", {})
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        calls.append(_builtin_as_custom(name, arguments))
        end = len(text) - len(text[end:].lstrip(" \t\n\r"))
    return calls


def _python_list_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    """[f(a=1), g(b="x")]: every call in the list, each with keyword arguments that are Python literals."""
    body = ast.parse(text, mode="eval").body
    if not isinstance(body, ast.List) or not body.elts:
        return None
    calls = []
    for node in body.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        calls.append(_builtin_as_custom(node.func.id, arguments))
    return calls


def _builtin_as_custom(name: str, arguments: dict) -> tuple[str, dict]:
    # A model given custom tools beside built-in ones may call a built-in in the custom format: llama-models
    # then takes the first argument's value as the query, and so does this.
    if name in BUILTIN_TOOLS and arguments:
        return name, {"query": next(iter(arguments.values()))}
    return name, arguments
