"""The tool prompts equal the ones in Meta's prompt_format.md for Llama 3.1 (shipped in llama-models), message
by message."""

import json
import re

import pytest
from generation_helpers import package_file

from llama.prompt_templates import function_tag_prompt, json_functions_prompt, system_prompt

PROMPT_FORMAT = package_file("llama_models", "llama3_1/prompt_format.md")
pytestmark = pytest.mark.skipif(PROMPT_FORMAT is None, reason="needs llama-models' llama3_1/prompt_format.md")


def example_messages(section: str) -> list[tuple[str, str]]:
    """(role, content) of the first input prompt under the heading `section` of prompt_format.md."""
    text = PROMPT_FORMAT.read_text()
    start = text.index(section)
    block = text[text.index("```\n", text.index("##### Input Prompt Format", start)) + 4 :]
    block = block[: block.index("```")]
    return re.findall(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", block, re.S)


def test_builtin_tools_system_prompt_is_metas():
    (role, content), _ = example_messages("## Builtin Tool Calling")[:2]
    assert role == "system"
    expected = system_prompt(
        "You are a helpful assistant.", builtin_tools=["brave_search", "wolfram_alpha"], today="21 September 2024"
    )
    assert content.strip() == expected


def test_code_interpreter_alone_is_environment_ipython():
    (role, content), _ = example_messages("## Builtin Code Interpreter")[:2]
    assert (role, content) == ("system", system_prompt(builtin_tools=["code_interpreter"]))


def test_json_functions_prompt_is_metas():
    (_, system), (role, user) = example_messages("## JSON based tool calling")[:2]
    assert system.strip() == system_prompt("You are a helpful assistant.", custom_tools=True, today="21 September 2024")
    # the same function as the function-tag example describes (its parameters' required flags included)
    _, (_, tagged) = example_messages("## `<function>` based tool calling")[:2]
    spec = json.loads(re.search(r"':\n(\{.*\})\n", tagged).group(1))
    spec["parameters"] = {name: spec["parameters"][name] for name in ("n", "genre")}  # Meta's example order
    assert role == "user" and user == json_functions_prompt([spec])


def test_function_tag_prompt_is_metas():
    (_, system), (role, user) = example_messages("## `<function>` based tool calling")[:2]
    assert system.strip() == system_prompt("You are a helpful assistant.", custom_tools=True, today="21 September 2024")
    spec = json.loads(re.search(r"':\n(\{.*\})\n", user).group(1))
    assert role == "user" and user == function_tag_prompt([spec])


def test_an_unknown_builtin_tool_says_how_to_describe_a_function():
    with pytest.raises(ValueError, match="custom_tools=True"):
        system_prompt(builtin_tools=["get_weather"])
