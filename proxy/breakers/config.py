"""The ``breakers:`` section of regate.yaml: defaults, per-tool overrides, validation.

Plain frozen dataclasses, validated once at load time; the hot path only reads
attributes. Three sections (``tool``, ``agent``, ``loop``) hold the defaults for
every tool, and ``overrides.<tool name>`` may restate any of their settings for
one tool. ``mode`` (enforce | warn) is one more such setting: ``breakers.mode`` is the
default of all three sections, and ``breakers.agents.<id>.mode`` overrides every guard
for one agent's calls (warn: a guard reports its refusal and lets the call run).
Every problem is reported with the field path that holds it
(``breakers.tool.failure_ratio: must be between 0 and 1 (got 1.5)``), all of
them at once, so a bad file is fixed in one pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True)
class ToolBreakerConfig:
    """Per tool: is the upstream sick?"""

    enabled: bool = True
    # Opens after this many failures in a row (0: only the ratio rule).
    consecutive_failures: int = 5
    # ... or when at least this share of the calls in the rolling window failed,
    failure_ratio: float = 0.5
    # ... once the window holds at least this many calls.
    min_calls: int = 20
    window_s: float = 30.0
    # Open for cooldown_s, then cooldown_s * multiplier ** (re-opens in a row), capped.
    cooldown_s: float = 5.0
    cooldown_multiplier: float = 2.0
    max_cooldown_s: float = 120.0
    # Half-open: this many probe calls go through; that many successes close it.
    half_open_probes: int = 1
    # A half-open episode that has not closed this long after its first probe re-opens.
    # Keep it above the tool's timeout_ms, or a slow probe re-opens a healthy tool.
    half_open_timeout_s: float = 60.0
    # warn: an open breaker's refusal is counted and audited, and the call runs.
    mode: str = "enforce"


@dataclass(frozen=True)
class AgentBackoffConfig:
    """Per agent x tool: this agent keeps failing against this tool."""

    enabled: bool = True
    # After this many failures in a row (4xx included) the pair backs off ...
    consecutive_failures: int = 3
    # ... for backoff_s, then backoff_s * multiplier ** (each further failure), capped.
    backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    max_backoff_s: float = 60.0
    # Memory bounds (global only): a pair untouched this long is forgotten; at most
    # max_entries failing pairs are remembered (the least recently failing go first).
    idle_ttl_s: float = 600.0
    max_entries: int = 10_000
    # warn: a back-off's refusal is counted and audited, and the call runs.
    mode: str = "enforce"


DEFAULT_IGNORE_FIELDS = (
    "request_id", "requestId", "nonce", "timestamp", "idempotency_key", "idempotencyKey",
    "trace_id", "traceId", "traceparent", "span_id", "correlation_id", "correlationId", "_meta",
)
# Statuses that by convention invite a retry of the very same call: the tool
# breaker and rate limits own those; repeating a call after them is not a loop.
DEFAULT_IGNORE_STATUSES = (408, 425, 429, 502, 503, 504)


@dataclass(frozen=True)
class LoopGuardConfig:
    """Per agent x tool x method x path: the same or near-same failing call again."""

    enabled: bool = True
    # Refuse a call once the same or a near-same call failed this many times ...
    repeats: int = 2
    # ... within this many seconds.
    window_s: float = 60.0
    # Jaccard similarity of the normalised bodies' shingles at or above which two
    # calls count as the same call (1.0: exact repeats only).
    similarity: float = 0.8
    # Keys (at any depth) whose values never make two calls different.
    ignore_fields: tuple[str, ...] = DEFAULT_IGNORE_FIELDS
    # Failures with these statuses are not loop material (see above); timeouts and
    # connect errors never are.
    ignore_statuses: tuple[int, ...] = DEFAULT_IGNORE_STATUSES
    # Memory bounds (global only): failures kept per agent x tool, and pairs kept.
    history: int = 16
    max_entries: int = 1024
    # warn: a loop's refusal is counted and audited, and the call runs.
    mode: str = "enforce"


@dataclass(frozen=True)
class BreakersConfig:
    tool: ToolBreakerConfig = ToolBreakerConfig()
    agent: AgentBackoffConfig = AgentBackoffConfig()
    loop: LoopGuardConfig = LoopGuardConfig()
    # tool name -> its fully merged sections; tools not named use the defaults.
    overrides: Mapping[str, "ToolOverride"] = field(default_factory=dict)
    # agent id -> mode (enforce | warn) of all three guards for that agent's calls.
    agent_modes: Mapping[str, str] = field(default_factory=dict)

    def tool_config(self, tool: str) -> ToolBreakerConfig:
        o = self.overrides.get(tool)
        return o.tool if o is not None else self.tool

    def agent_config(self, tool: str) -> AgentBackoffConfig:
        o = self.overrides.get(tool)
        return o.agent if o is not None else self.agent

    def loop_config(self, tool: str) -> LoopGuardConfig:
        o = self.overrides.get(tool)
        return o.loop if o is not None else self.loop


@dataclass(frozen=True)
class ToolOverride:
    tool: ToolBreakerConfig
    agent: AgentBackoffConfig
    loop: LoopGuardConfig


# --- validation -------------------------------------------------------------

Check = Callable[[Any], "str | None"]


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0 (got {v})"


def _at_least(n: float) -> Check:
    return lambda v: None if v >= n else f"must be at least {n} (got {v})"


def _ratio(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be between 0 and 1 (got {v})"


def _mode(v: str) -> str | None:
    return None if v in ("enforce", "warn") else f"must be enforce or warn (got {v!r})"


def _statuses(v: tuple[int, ...]) -> str | None:
    bad = [s for s in v if not 400 <= s <= 599]
    return f"must be HTTP error statuses 400-599 (got {bad[0]})" if bad else None


_CHECKS: dict[type, dict[str, Check]] = {
    ToolBreakerConfig: {
        "consecutive_failures": _at_least(0),
        "mode": _mode,
        "failure_ratio": _ratio,
        "min_calls": _at_least(1),
        "window_s": _positive,
        "cooldown_s": _positive,
        "cooldown_multiplier": _at_least(1),
        "max_cooldown_s": _positive,
        "half_open_probes": _at_least(1),
        "half_open_timeout_s": _positive,
    },
    AgentBackoffConfig: {
        "consecutive_failures": _at_least(1),
        "mode": _mode,
        "backoff_s": _positive,
        "backoff_multiplier": _at_least(1),
        "max_backoff_s": _positive,
        "idle_ttl_s": _positive,
        "max_entries": _at_least(1),
    },
    LoopGuardConfig: {
        "repeats": _at_least(1),
        "mode": _mode,
        "window_s": _positive,
        "similarity": _ratio,
        "ignore_statuses": _statuses,
        "history": _at_least(1),
        "max_entries": _at_least(1),
    },
}

# Settings that bound memory for all tools together: not per tool.
_GLOBAL_ONLY = {
    AgentBackoffConfig: ("idle_ttl_s", "max_entries"),
    LoopGuardConfig: ("history", "max_entries"),
}

_SECTIONS = {"tool": ToolBreakerConfig, "agent": AgentBackoffConfig, "loop": LoopGuardConfig}


def _coerce(value: Any, default: Any, where: str, problems: list[str]) -> Any:
    """Check value against the type of the field's default; return it normalised."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: must be true or false (got {value!r})")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: must be a whole number (got {value!r})")
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        problems.append(f"{where}: must be a number (got {value!r})")
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        problems.append(f"{where}: must be a string (got {value!r})")
    elif isinstance(default, tuple):
        want = type(default[0]) if default else str
        if isinstance(value, (list, tuple)) and all(
            isinstance(x, want) and not isinstance(x, bool) for x in value
        ):
            return tuple(value)
        noun = "strings" if want is str else "whole numbers"
        problems.append(f"{where}: must be a list of {noun} (got {value!r})")
    return None


def _section(raw: Any, base: Any, where: str, problems: list[str], per_tool: bool = False) -> Any:
    cls = type(base)
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping of settings (got {type(raw).__name__})")
        return base
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    start = len(problems)
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key not in fields:
            problems.append(f"{at}: unknown key (known: {', '.join(fields)})")
            continue
        if per_tool and key in _GLOBAL_ONLY.get(cls, ()):
            problems.append(f"{at}: bounds memory for all tools; set it under breakers.{where.rsplit('.', 1)[-1]}")
            continue
        v = _coerce(value, getattr(base, key), at, problems)
        if v is None:
            continue
        check = _CHECKS[cls].get(key)
        msg = check(v) if check else None
        if msg:
            problems.append(f"{at}: {msg}")
            continue
        changes[key] = v
    merged = dataclasses.replace(base, **changes)
    if len(problems) == start:
        _cross_check(merged, where, problems)
    return merged


def _cross_check(c: Any, where: str, problems: list[str]) -> None:
    if isinstance(c, ToolBreakerConfig) and c.max_cooldown_s < c.cooldown_s:
        problems.append(f"{where}.max_cooldown_s: must be at least cooldown_s ({c.cooldown_s:g}), got {c.max_cooldown_s:g}")
    if isinstance(c, AgentBackoffConfig) and c.max_backoff_s < c.backoff_s:
        problems.append(f"{where}.max_backoff_s: must be at least backoff_s ({c.backoff_s:g}), got {c.max_backoff_s:g}")
    if isinstance(c, LoopGuardConfig) and c.history < c.repeats:
        problems.append(f"{where}.history: must be at least repeats ({c.repeats}), got {c.history}")


def parse(raw: Mapping[str, Any] | None, tools: Iterable[str] | None = None, where: str = "breakers") -> BreakersConfig:
    """Validate a ``breakers:`` mapping; raise ValueError with one line per problem.

    ``tools``, when given, are the configured tool names: an override naming any
    other tool is an error (a typo would otherwise silently configure nothing).
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping of settings (got {type(raw).__name__})")
    for key in raw:
        if key not in (*_SECTIONS, "overrides", "mode", "agents"):
            problems.append(f"{where}.{key}: unknown key (known: mode, tool, agent, loop, overrides, agents)")
    # breakers.mode: the default mode of all three sections (each may restate its own).
    top = raw.get("mode", "enforce")
    if top not in ("enforce", "warn"):
        problems.append(f"{where}.mode: must be enforce or warn (got {top!r})")
        top = "enforce"
    sections = {
        name: _section(raw.get(name), cls(mode=top), f"{where}.{name}", problems)
        for name, cls in _SECTIONS.items()
    }
    agent_modes: dict[str, str] = {}
    raw_agents = raw.get("agents") or {}
    if not isinstance(raw_agents, Mapping):
        problems.append(f"{where}.agents: must map agent ids to {{mode: enforce | warn}} "
                        f"(got {type(raw_agents).__name__})")
        raw_agents = {}
    for agent_id, body in raw_agents.items():
        at = f"{where}.agents.{agent_id}"
        if not isinstance(body, Mapping) or set(body) != {"mode"}:
            problems.append(f"{at}: must be {{mode: enforce | warn}} (got {body!r})")
        elif body["mode"] not in ("enforce", "warn"):
            problems.append(f"{at}.mode: must be enforce or warn (got {body['mode']!r})")
        else:
            agent_modes[str(agent_id)] = body["mode"]
    overrides: dict[str, ToolOverride] = {}
    raw_over = raw.get("overrides") or {}
    if not isinstance(raw_over, Mapping):
        problems.append(f"{where}.overrides: must map tool names to settings (got {type(raw_over).__name__})")
        raw_over = {}
    known_tools = set(tools) if tools is not None else None
    for tool, body in raw_over.items():
        at = f"{where}.overrides.{tool}"
        if known_tools is not None and tool not in known_tools:
            problems.append(f"{at}: no tool named {tool!r} (tools: {', '.join(sorted(known_tools)) or 'none'})")
            continue
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            problems.append(f"{at}: must be a mapping with tool / agent / loop (got {type(body).__name__})")
            continue
        for key in body:
            if key not in _SECTIONS:
                problems.append(f"{at}.{key}: unknown key (known: tool, agent, loop)")
        overrides[str(tool)] = ToolOverride(
            **{name: _section(body.get(name), sections[name], f"{at}.{name}", problems, per_tool=True)
               for name in _SECTIONS}
        )
    if problems:
        raise ValueError("\n".join(problems))
    return BreakersConfig(overrides=overrides, agent_modes=agent_modes, **sections)
