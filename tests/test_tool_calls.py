"""Forced tool choice: the schema the first step must match, and reading its calls (pure logic)."""

from __future__ import annotations

import pytest


def test_required_tool_choice_schema_and_calls() -> None:
    import json

    from lorag.serving.tool_calls import ToolPlan, forced_choice

    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    plan = ToolPlan(server={}, client=[weather], parser="hermes", max_steps=1, timeout_s=1.0,
                    forced=forced_choice("required", {"weather"}))
    schema = plan.forced_schema()
    assert schema is not None and schema["minItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "weather"}
    calls = plan.forced_calls(json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}}]))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", {"city": "Oslo"})]
    assert plan.forced_calls('[{"name": "weather", "argu') == []  # cut short: no call
    with pytest.raises(Exception, match="not among the tools"):
        forced_choice({"type": "function", "function": {"name": "nope"}}, {"weather"})
