"""A server-side tool for the tool-loop tests."""

from typing import Any, Literal

from lorag.plugins import hookimpl


def exchange_rate(currency: Literal["EUR", "GBP", "XXX"]) -> dict[str, Any]:
    """Exchange rate of a currency against the US dollar."""
    if currency == "XXX":
        raise ValueError("unknown currency XXX")
    return {"currency": currency, "usd": 1.08}


@hookimpl
def register_tools(register: Any) -> None:
    register(exchange_rate)
