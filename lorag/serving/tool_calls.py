"""Tools in a chat request: which run on the server, which go back to the client, and reading calls from text.

Tool calls are read from the model's text with vLLM's tool parser for the model's
family (`[domains.<name>.tools] parser`, e.g. "hermes", "llama3_json", "mistral"),
so lorag reads exactly the format vLLM's own server would.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.plugins.tools import Tool

log = get_logger("lorag.tools")
_PARSERS: dict[tuple[str, int], Any] = {}
_PARSERS_GUARD = threading.Lock()


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """The tools one request may use."""

    server: dict[str, Tool]
    client: list[dict[str, Any]]
    parser: str
    max_steps: int
    timeout_s: float
    # tool_choice "required" or a tool's name: the first step must call (enforced by structured output).
    forced: str | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)

    def forced_schema(self) -> dict[str, Any] | None:
        """What the first step's output must match: the named tool's arguments, or a list of calls."""
        if self.forced is None:
            return None
        parameters = {s["function"]["name"]: s["function"].get("parameters") or {"type": "object"}
                      for s in self.schemas}
        if self.forced != "required":
            return parameters[self.forced]
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                  "required": ["name", "arguments"]} for name, schema in parameters.items()]
        return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}

    def forced_calls(self, text: str) -> list[ToolCall]:
        """The calls in a forced step's output (structured output made it match forced_schema)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return []  # cut short by max_tokens: no complete call
        if self.forced != "required":
            return [ToolCall(new_call_id(), str(self.forced), json.dumps(data, ensure_ascii=False))]
        return [ToolCall(new_call_id(), str(c["name"]), json.dumps(c["arguments"], ensure_ascii=False))
                for c in data if isinstance(c, dict) and "name" in c]

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """Every tool in OpenAI form, for the chat template."""
        return [tool.openai_schema() for tool in self.server.values()] + self.client


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_choice(tool_choice: Any, names: set[str]) -> str | None:
    """tool_choice -> None ("auto"/"none"/absent), "required", or the one tool's name (checked)."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return "required"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise LoragError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if name not in names:
        raise LoragError(f"tool_choice names '{name}', which is not among the tools", param="tool_choice")
    return name


def client_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]]:
    """The request's own function tools, checked; none when tool_choice is "none"."""
    if not tools or tool_choice == "none":
        return []
    checked = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise LoragError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                             param=f"tools[{index}]")
        checked.append(tool)
    return checked


def parse_tool_calls(parser: str, tokenizer: Any, text: str, schemas: list[dict[str, Any]]) -> tuple[str, list[ToolCall]]:
    """(text without the calls, the calls) as vLLM's parser reads them; a parser failure means no calls."""
    instance = _parser(parser, tokenizer)
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate({"model": "lorag", "messages": [], "tools": schemas or None})
        found = instance.extract_tool_calls(text, request)
    except Exception as err:  # a malformed call is text, not a crash
        log.warning("tool_parse_failed", parser=parser, error=str(err))
        return text, []
    if not found.tools_called:
        return text, []
    calls = [ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments or "{}")
             for call in found.tool_calls]
    return found.content or "", calls


def _parser(name: str, tokenizer: Any) -> Any:
    key = (name, id(tokenizer))
    with _PARSERS_GUARD:
        if key not in _PARSERS:
            from vllm.tool_parsers import ToolParserManager

            try:
                cls = ToolParserManager.get_tool_parser(name)
            except KeyError:
                raise LoragError(f"no vLLM tool parser named '{name}'; known: "
                                 f"{', '.join(ToolParserManager.list_registered())}") from None
            _PARSERS[key] = cls(tokenizer)
        return _PARSERS[key]


def arguments_of(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as err:
        raise LoragError(f"Tool '{call.name}': arguments are not JSON: {err}") from None
    if not isinstance(arguments, dict):
        raise LoragError(f"Tool '{call.name}': arguments must be a JSON object")
    return arguments


def result_text(result: Any) -> str:
    """What the model reads back: JSON for data, the text itself for strings."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
