"""Built-in plugin `json_schema`: answers that are JSON matching a schema.

The schema comes from the request's response_format ({"type": "json_schema",
"json_schema": {"schema": ...}} or {"type": "json_object"}) or else from the
domain's settings. lorag asks vLLM for structured output, so the text is valid by
construction; it is still validated here (a max_tokens cut, or a keyword the
grammar backend does not enforce, can break it), and an invalid answer is retried
with the error as a user turn, up to `max_retries`, then refused with an error.
The output is held until validated: a retry cannot unsend text.

`compact` (the default) asks for JSON without free whitespace. vLLM 0.32 ignores
the per-request `disable_any_whitespace` (only the engine-wide setting counts),
and a model may fill its whole budget with whitespace the schema allows, so the
constraint is sent as the grammar xgrammar (vLLM's default backend) builds from
the schema with fixed separators; without xgrammar it falls back to `json=schema`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorag.errors import LoragError
from lorag.plugins.hookspecs import hookimpl
from lorag.plugins.types import PluginContext, Verdict


class JsonSchemaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: dict[str, Any] | None = Field(default=None, alias="schema",
                                           description="JSON Schema every answer of the domain must match.")
    schema_file: str | None = Field(default=None, description="The schema from a JSON file instead.")
    compact: bool = Field(default=True, description="No free whitespace between JSON tokens.")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_schema(value, "schema")
        return value

    @model_validator(mode="after")
    def _load_file(self) -> JsonSchemaSettings:
        if self.schema_file:
            if self.schema_ is not None:
                raise ValueError("give schema or schema_file, not both")
            try:
                self.schema_ = json.loads(Path(self.schema_file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ValueError(f"schema_file: cannot read a JSON schema from it: {err}") from None
            check_schema(self.schema_, "schema_file")
        return self


def check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(f"{where} is not a valid JSON Schema: {err.message}") from None


def requested_schema(response_format: dict[str, Any] | None, default: dict[str, Any] | None
                     ) -> tuple[bool, dict[str, Any] | None]:
    """(JSON wanted?, schema or None) from an OpenAI response_format."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        try:
            check_schema(schema, "response_format.json_schema.schema")
        except ValueError as err:
            raise LoragError(str(err), param="response_format") from None
        return True, schema
    if kind == "json_object":
        return True, None
    if kind == "text":
        return default is not None, default
    raise LoragError(f"response_format.type {kind!r} is not supported: use 'text', 'json_object' or "
                     "'json_schema'.", param="response_format")


@hookimpl
def settings_model() -> type[BaseModel]:
    return JsonSchemaSettings


@hookimpl
def sampling_params(params: dict[str, Any], response_format: dict[str, Any] | None,
                    ctx: PluginContext) -> dict[str, Any] | None:
    settings: JsonSchemaSettings = ctx.settings
    wanted, schema = requested_schema(response_format, settings.schema_)
    if not wanted:
        return None
    ctx.state.update(json=True, schema=schema)
    ctx.hold_output()
    return {**params, "structured_outputs": constraint(schema, settings.compact)}


def constraint(schema: dict[str, Any] | None, compact: bool) -> Any:
    """The vLLM StructuredOutputsParams for a schema (None: any JSON object)."""
    from vllm.sampling_params import StructuredOutputsParams  # only where the engine runs

    if compact:
        grammar = compact_grammar(json.dumps(schema if schema is not None else {"type": "object"},
                                             sort_keys=True))
        if grammar is not None:
            return StructuredOutputsParams(grammar=grammar)
    if schema is None:
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=compact)
    return StructuredOutputsParams(json=schema, disable_any_whitespace=compact)


@lru_cache(maxsize=256)
def compact_grammar(schema_json: str) -> str | None:
    """xgrammar's EBNF for the schema, with no free whitespace (None without xgrammar)."""
    try:
        import xgrammar
    except ImportError:
        return None
    grammar = xgrammar.Grammar.from_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))
    return str(grammar)


@hookimpl
def output_complete(text: str, ctx: PluginContext) -> Verdict | None:
    if not ctx.state.get("json"):
        return None
    problem = json_problem(text, ctx.state.get("schema"))
    if problem is None:
        return None
    return Verdict.retry(f"Your previous answer was not valid: {problem}. Answer again with only the JSON "
                         "value, nothing else.")


def json_problem(text: str, schema: dict[str, Any] | None) -> str | None:
    """Why `text` is not JSON matching `schema` (any JSON object without one), or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg} at character {err.pos})"
    if schema is None:
        return None if isinstance(value, dict) else "a JSON object was required"
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return f"at {where}: {error.message}"
