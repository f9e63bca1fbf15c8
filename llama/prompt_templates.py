"""The prompts Llama 3.1+ instruct models were tuned with for tools, as Meta's prompt_format.md gives them: the
system message that turns tools on, and the user message that describes your own functions. Plain strings, for
the "content" of a message; the chat format adds the headers."""

import json
from collections.abc import Sequence
from typing import Optional

# The built-in tools a Llama 3.1 system prompt turns on, as prompt_format.md lists them (tool_utils.BUILTIN_TOOLS,
# the ones a model calls by name, also holds photogen, which no system prompt of Meta's names).
SYSTEM_PROMPT_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")


def system_prompt(
    instructions: str = "",
    *,
    builtin_tools: Sequence[str] = (),
    custom_tools: bool = False,
    today: Optional[str] = None,
    knowledge_cutoff: str = "December 2023",
) -> str:
    """A system message's content: "Environment: ipython" when any tool is on (it alone turns on the code
    interpreter), a "Tools:" line for brave_search and wolfram_alpha, the dates when `today` is given (e.g.
    "21 September 2024"), then your instructions. custom_tools: functions are described in a user message
    (json_functions_prompt, function_tag_prompt)."""
    unknown = [t for t in builtin_tools if t not in SYSTEM_PROMPT_TOOLS]
    if unknown:
        raise ValueError(
            f"{', '.join(map(repr, unknown))} not among the built-in tools {', '.join(SYSTEM_PROMPT_TOOLS)}: describe "
            "your own functions in a user message (json_functions_prompt or function_tag_prompt) and pass "
            "custom_tools=True"
        )
    lines = []
    if builtin_tools or custom_tools:
        lines.append("Environment: ipython")
        named = [t for t in builtin_tools if t != "code_interpreter"]
        if named:
            lines.append("Tools: " + ", ".join(named))
        elif today is not None:
            lines.append("")
    if today is not None:
        lines += [f"Cutting Knowledge Date: {knowledge_cutoff}", f"Today Date: {today}"]
    return "\n\n".join(part for part in ("\n".join(lines), instructions) if part)


def json_functions_prompt(functions: Sequence[dict]) -> str:
    """A user message's content that offers your functions, for replies of the form {"name": ...,
    "parameters": {...}} (tool_prompt_format "json"). Each function: {"name", "description", "parameters":
    {name: {"description", "param_type", "required"}}}, as function_tag_prompt takes them, laid out as Meta's
    template lays them out."""
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        f"Here is a list of functions in JSON format:\n{chr(10).join(_json_schema(f) for f in functions)}\n\n"
        "Return function calls in JSON format."
    )


def _json_schema(function: dict) -> str:
    params = function.get("parameters", {})
    properties = ",\n".join(
        f"                {{\n                    {json.dumps(name)}: {{\n"
        '                        "type": "object",\n'
        f"                        \"description\": {json.dumps(p.get('description', ''))}\n"
        "                    }\n                }"
        for name, p in params.items()
    )
    required = [name for name, p in params.items() if p.get("required", True)]
    return (
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        f'        "name": {json.dumps(function["name"])},\n'
        f'        "description": {json.dumps(function.get("description", ""))},\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        f'            "properties": [\n{properties}\n            ],\n'
        f'            "required": {json.dumps(required)}\n'
        "        }\n"
        "    }\n"
        "}"
    )


def function_tag_prompt(functions: Sequence[dict]) -> str:
    """A user message's content that offers your functions, each {"name", "description", "parameters"}, for
    replies of the form <function=name>{"arg": value}</function> (tool_prompt_format "function_tag")."""
    described = "\n\n".join(
        f"Use the function '{f['name']}' to '{f['description']}':\n{json.dumps(f)}" for f in functions
    )
    return (
        f"You have access to the following functions:\n\n{described}\n\n"
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )
