"""Tools: which a request may use (the domain's server-side tools and the client's own), and
the loop that runs them: generate, run the server-side calls, feed their results back.

Steps with tool calls are not shown to the client (their calls and results are, in
`lorag.tools`); the final answer goes through the output hooks like any other, and calls
to the client's own tools end the request with finish_reason "tool_calls".
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from lorag import lanes
from lorag.errors import LoragError
from lorag.logging import get_logger
from lorag.plugins.tools import Tool
from lorag.serving.generation import Generator
from lorag.serving.jobs import Delta, Job, Target, ms_since
from lorag.serving.output_checks import checked_output
from lorag.serving.settings import DomainTools
from lorag.serving.tool_calls import (
    ToolCall,
    ToolPlan,
    arguments_of,
    client_tools,
    forced_choice,
    parse_tool_calls,
    result_text,
)

if TYPE_CHECKING:
    from lorag.plugins.host import RequestHooks
    from lorag.serving.protocol import ChatCompletionRequest

log = get_logger("lorag.request")
# A step without a requested max_tokens goes ahead only with at least this much room.
MIN_STEP_TOKENS = 16


def tool_plan(target: Target, hooks: RequestHooks, request: ChatCompletionRequest) -> ToolPlan | None:
    """Server-side tools the domain enables, plus the client's own; None when there are neither.

    Each server-side tool is bound to its plugin's context for this request (a tool that takes
    `ctx` sees the domain, its settings and its knowledge search).
    """
    client = client_tools(request.tools, request.tool_choice)
    domain = target.domain
    server: dict[str, Tool] = {}
    if domain is not None and request.tool_choice != "none":
        offered = {tool.name: tool for tool in hooks.tools}
        for name in domain.settings.tools.enabled:
            if name in offered:
                server[name] = offered[name].bound(hooks.context(offered[name].plugin))
            else:
                log.warning("tool_unavailable", domain=domain.name, tool=name)
    if not server and not client:
        return None
    clash = sorted(server.keys() & {str(t["function"]["name"]) for t in client})
    if clash:
        raise LoragError(f"the tool '{clash[0]}' is one of the domain's own tools; rename yours", param="tools")
    if request.n != 1:
        raise LoragError("n must be 1 when tools are in play", param="n")
    cfg = domain.settings.tools if domain else DomainTools()
    forced = forced_choice(request.tool_choice, set(server) | {str(t["function"]["name"]) for t in client})
    return ToolPlan(server=server, client=client, parser=cfg.parser, max_steps=cfg.max_steps,
                    timeout_s=cfg.timeout_s, forced=forced)


async def tool_loop(generator: Generator, job: Job, counts: dict[str, int],
                    started: float) -> AsyncGenerator[Delta, None]:
    """Generate, run the server-side calls, feed their results back, up to the plan's max_steps."""
    plan = job.tools
    assert plan is not None and job.messages is not None
    prompt = job.prompts[0]
    free_params = job.params
    stopped: str | None = None
    steps = 0
    raw: list[Delta] = []
    for step in range(plan.max_steps + 1):
        forced = step == 0 and plan.forced is not None
        job.params = _forcing(free_params, plan) if forced else free_params
        raw = [delta async for delta in generator.deltas(job, 0, prompt, counts, started)]
        job.params = free_params
        text = "".join(delta.text for delta in raw)
        if forced:
            content, calls = "", plan.forced_calls(text)
        else:
            content, calls = parse_tool_calls(plan.parser, generator.engine.tokenizer, text, plan.schemas)
        if not calls:
            break
        if step == plan.max_steps:
            stopped, steps = "max_steps", step
            break
        for_client = [call for call in calls if call.name not in plan.server]
        results = [await _run_tool(plan, call, step) for call in calls if call.name in plan.server]
        if for_client:
            job.tool_calls[0] = for_client
            job.extras["tools"] = {"calls": plan.trace}
            yield Delta(0, content, [], None, "tool_calls")
            return
        job.messages = [*job.messages,
                        {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]},
                        *({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
                          for call, result in zip(calls, results, strict=True))]
        following = await lanes.PROMPTS.run(generator.chat_prompt, job.messages, plan.schemas)
        if not _fits_next_step(generator, job, len(following)):
            stopped, steps = "context_length", step + 1
            break
        prompt = job.prompts[0] = following
        free_params = job.params  # _fits_next_step may have given the next step a new max_tokens
    job.extras["tools"] = {"calls": plan.trace}
    if stopped is not None:
        log.info("tool_loop_stopped", reason=stopped, steps=steps)
        job.extras["tools"]["stopped"] = stopped
    # The last step's output (an answer, or the call the loop could not follow) goes through the hooks.
    async with aclosing(checked_output(generator, job, 0, prompt, counts, started, _replay(raw))) as final:
        async for delta in final:
            yield delta


def _fits_next_step(generator: Generator, job: Job, prompt_len: int) -> bool:
    """Room for the next step's answer; without a requested max_tokens it takes what is left."""
    room = generator.engine.max_model_len - prompt_len
    if job.requested_max_tokens is not None:
        return room >= job.requested_max_tokens
    if room < MIN_STEP_TOKENS:
        return False
    job.params = job.params.clone()
    job.params.max_tokens = room
    return True


async def _run_tool(plan: ToolPlan, call: ToolCall, step: int) -> str:
    """One server-side call, bounded by the domain's timeout; a failure is a result the model reads."""
    mark = time.perf_counter()
    entry: dict[str, Any] = {"step": step + 1, "id": call.id, "name": call.name, "arguments": call.arguments}
    try:
        arguments = arguments_of(call)
        # Its own lane: a call that times out runs on in its thread and keeps its place there
        # until it returns, but never takes a thread that hooks or retrieval need.
        result = await lanes.TOOLS.run(plan.server[call.name].call, arguments, timeout=plan.timeout_s)
        entry["result"] = text = result_text(result)
    except Exception as err:
        message = f"timed out after {plan.timeout_s} s" if isinstance(err, TimeoutError) else str(err)
        entry["error"] = message
        text = result_text({"error": message})
    entry["duration_ms"] = ms_since(mark)
    plan.trace.append(entry)
    log.info("tool_call", tool=call.name, step=step + 1, ok="error" not in entry, duration_ms=entry["duration_ms"])
    return text


def _forcing(params: Any, plan: ToolPlan) -> Any:
    """The step's sampling parameters with its output held to the forced tool call(s)."""
    from lorag.plugins.builtin.json_schema import constraint

    forced = params.clone()
    forced.structured_outputs = constraint(plan.forced_schema(), compact=True)
    return forced


async def _replay(deltas: list[Delta]) -> AsyncGenerator[Delta, None]:
    for delta in deltas:
        yield delta
