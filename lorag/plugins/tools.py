"""Tools plugins offer: a Python function plus the OpenAI function schema derived from it.

Writing a tool should be writing a typed, documented function; the JSON schema
of its parameters comes from the type hints and its description from the
docstring, so the two cannot drift apart. A tool that declares a `ctx` parameter gets the
request's PluginContext (its domain, settings, the domain's knowledge search); the model never
sees that parameter.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jsonschema

from lorag.errors import LoragError

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}
CONTEXT_PARAMETER = "ctx"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    plugin: str
    takes_context: bool = False

    def bound(self, ctx: Any) -> Tool:
        """This tool with one request's PluginContext filled in (itself when it takes none)."""
        if not self.takes_context:
            return self
        return replace(self, function=partial(self.function, **{CONTEXT_PARAMETER: ctx}), takes_context=False)

    def openai_schema(self) -> dict[str, Any]:
        """The `tools` entry of an OpenAI chat request."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def call(self, arguments: dict[str, Any]) -> Any:
        """Validate the model's arguments against the schema, then call the function."""
        try:
            jsonschema.validate(arguments, self.parameters)
        except jsonschema.ValidationError as err:
            raise LoragError(f"Tool '{self.name}': invalid arguments: {err.message}") from None
        return self.function(**arguments)


def json_type(annotation: Any) -> dict[str, Any]:
    """JSON schema of a parameter annotation (str, int, float, bool, list[...], Literal, Optional)."""
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", "items": json_type(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        options = [json_type(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        if type(None) in args:
            return {"anyOf": [schema, {"type": "null"}]}
        return schema
    return {}


def tool_from_function(
    function: Callable[..., Any], *, plugin: str, name: str | None = None, description: str | None = None
) -> Tool:
    """Build a Tool; parameters without a default are required, `ctx` is lorag's to fill."""
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    parameters = inspect.signature(function).parameters
    for param in parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name == CONTEXT_PARAMETER:
            continue
        properties[param.name] = json_type(hints.get(param.name, Any))
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    doc = inspect.getdoc(function) or ""
    return Tool(
        name=name or function.__name__,
        description=description or doc.split("\n\n")[0].replace("\n", " "),
        parameters={"type": "object", "properties": properties, "required": required,
                    "additionalProperties": False},
        function=function,
        plugin=plugin,
        takes_context=CONTEXT_PARAMETER in parameters,
    )
