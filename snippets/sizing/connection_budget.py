"""Add up the connections serverless functions can open, and find which one to cap to fit.

Each instance of a function keeps a pool of its own, so at the server

    connections = sum(max_concurrency * pool_max over the functions) + reserved

where reserved counts everything else that connects: other services, migrations, consoles.

>>> budget = plan_connections(
...     [
...         {"name": "checkout", "max_concurrency": 100, "pool_max": 1},
...         {"name": "reports", "max_concurrency": 20, "pool_max": 3},
...     ],
...     connection_limit=150,
...     reserved=10,
... )
>>> budget.total, budget.headroom, budget.overflow
(170, 0, 20)
>>> budget.cap
ConcurrencyCap(function='checkout', max_concurrency=80)
>>> print(budget.summary())  # doctest: +NORMALIZE_WHITESPACE
The functions and the reserved connections need 170 of 150 connections, 20 too many.
Cap the maximum concurrency of checkout at 80 (now 100).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FIELDS = ("name", "max_concurrency", "pool_max")
# Keeps every total an exact integer in JavaScript too, where the page's calculator runs.
MAX_COUNT = 1_000_000


class ConnectionBudgetError(ValueError):
    """An invalid input to plan_connections(), with its name in `field` and itself in `value`."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


@dataclass(frozen=True)
class FunctionPool:
    """One function: how many instances can run at once and the pool maximum of each."""

    name: str
    max_concurrency: int
    pool_max: int

    @property
    def connections(self) -> int:
        return self.max_concurrency * self.pool_max


@dataclass(frozen=True)
class ConcurrencyCap:
    """The maximum concurrency to give one function so that the total fits the limit."""

    function: str
    max_concurrency: int


@dataclass(frozen=True)
class ConnectionBudget:
    """The connections the functions need, compared with the server's connection limit."""

    functions: tuple[FunctionPool, ...]
    reserved: int
    connection_limit: int
    total: int
    headroom: int
    overflow: int
    cap: ConcurrencyCap | None

    @property
    def fits(self) -> bool:
        return self.overflow == 0

    def summary(self) -> str:
        need = (
            f"The functions and the reserved connections need {self.total} "
            f"of {self.connection_limit} connections"
        )
        if self.fits:
            return f"{need}, leaving {self.headroom} free."
        if self.cap is None:
            return (
                f"{need}, {self.overflow} too many, and capping the concurrency of one "
                "function cannot make them fit: lower the pool maximums, cap several "
                "functions, or raise the connection limit."
            )
        current = next(f for f in self.functions if f.name == self.cap.function)
        return (
            f"{need}, {self.overflow} too many. Cap the maximum concurrency of "
            f"{self.cap.function} at {self.cap.max_concurrency} (now {current.max_concurrency})."
        )


def show(value: object) -> str:
    """Format a rejected value as JSON, as the page's JavaScript calculator does."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


def check_count(field: str, value: object, minimum: int) -> int:
    # bool is a subclass of int, so True would otherwise pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConnectionBudgetError(
            field, value, f"{field} must be a whole number, got {show(value)}"
        )
    if not minimum <= value <= MAX_COUNT:
        raise ConnectionBudgetError(
            field,
            value,
            f"{field} must be between {minimum} and {MAX_COUNT}, got {show(value)}",
        )
    return value


def parse_function(entry: object, position: int) -> FunctionPool:
    where = f"functions[{position}]"
    if not isinstance(entry, Mapping):
        raise ConnectionBudgetError(
            where,
            entry,
            f"{where} must be an object with the fields name, max_concurrency and pool_max, "
            f"got {show(entry)}",
        )

    for key in entry:
        if key not in FIELDS:
            raise ConnectionBudgetError(
                f"{where}.{key}",
                entry[key],
                f"{where}.{key} is not a known field (its value is {show(entry[key])}); "
                "the fields are name, max_concurrency and pool_max",
            )
    for key in FIELDS:
        if key not in entry:
            raise ConnectionBudgetError(f"{where}.{key}", None, f"{where}.{key} is missing")

    name = entry["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConnectionBudgetError(
            f"{where}.name", name, f"{where}.name must be a non-empty string, got {show(name)}"
        )
    return FunctionPool(
        name,
        check_count(f"{where}.max_concurrency", entry["max_concurrency"], minimum=1),
        check_count(f"{where}.pool_max", entry["pool_max"], minimum=1),
    )


def parse_functions(functions: object) -> tuple[FunctionPool, ...]:
    if isinstance(functions, str | bytes | Mapping) or not isinstance(functions, Sequence):
        raise ConnectionBudgetError(
            "functions", functions, f"functions must be a list, got {show(functions)}"
        )
    if not functions:
        raise ConnectionBudgetError(
            "functions", functions, "functions is empty; list at least one function"
        )

    parsed: list[FunctionPool] = []
    first_position: dict[str, int] = {}
    for position, entry in enumerate(functions):
        function = parse_function(entry, position)
        if function.name in first_position:
            raise ConnectionBudgetError(
                f"functions[{position}].name",
                function.name,
                f"functions[{position}].name {show(function.name)} repeats "
                f"functions[{first_position[function.name]}].name; give each function "
                "a unique name",
            )
        first_position[function.name] = position
        parsed.append(function)
    return tuple(parsed)


def find_cap(functions: Sequence[FunctionPool], overflow: int) -> ConcurrencyCap | None:
    """Return the smallest cut that fits, taken from the function that needs the most.

    Returns None when no single function can shed the overflow and keep one instance.
    """
    # sorted() is stable, so of two functions that need as many, the first listed wins.
    for function in sorted(functions, key=lambda f: f.connections, reverse=True):
        allowed = (function.connections - overflow) // function.pool_max
        if allowed >= 1:
            return ConcurrencyCap(function.name, allowed)
    return None


def plan_connections(
    functions: Sequence[Mapping[str, object]], connection_limit: int, reserved: int = 0
) -> ConnectionBudget:
    """Compare the connections the functions can open with the server's connection limit.

    Each entry of *functions* has exactly the fields name, max_concurrency and pool_max.
    *reserved* is the number of connections kept for everything else. Raises
    ConnectionBudgetError naming the first invalid field and its value.
    """
    limit = check_count("connection_limit", connection_limit, minimum=1)
    kept = check_count("reserved", reserved, minimum=0)
    parsed = parse_functions(functions)

    total = sum(function.connections for function in parsed) + kept
    overflow = max(0, total - limit)
    cap = find_cap(parsed, overflow) if overflow else None
    return ConnectionBudget(parsed, kept, limit, total, max(0, limit - total), overflow, cap)
