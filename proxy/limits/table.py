"""The limits table: what the policy data declares, compiled once, and resolving one call's limits.

``compile_limits`` turns the limits document (``policies/limits.yaml``, the same
data the Rego sees) into a ``LimitsTable``; every error names the field, such as
``limits.agents.coder-7.tools.shell.rate``. ``resolve_limits`` is the pure,
per-call step: (table, agent, tool) → ``EffectiveLimits``.

Precedence, most specific first. Agent key: ``agents.<a>.agent`` > ``defaults.agent``.
Agent×tool key: ``agents.<a>.tools.<t>`` > ``tools.<t>`` > ``defaults.tool``. Budget:
``agents.<a>.budget`` > ``defaults.budget``. A spec replaces the one below it whole (a
rate and its burst come from the same place); ``null`` or ``unlimited`` means no limit;
an absent key means "inherit". A spec may be a list of windows, all checked at once.

Mode (enforce | warn): a spec's own ``mode`` > ``agents.<a>.mode`` > the document's
``mode`` (default enforce); ``EffectiveLimits.*_warn`` carries it to the stage.

The decision's ``limits`` (same spellings) arrive after these limits were checked, so
the pipeline applies them as *additional* limits on keys of their own
(``decision_limits``; the ratelimit stage's ``enforce_decision``): a decision can
tighten one call's limits, never lift the data's. ``resolve_limits(..., override)``
still answers "these limits with the decision's in place of the data's", a pure view.
"""

from __future__ import annotations

from typing import Any, Mapping

from .budgets import Budget, BudgetWindows, parse_duration
from .gcra import Rate, Windows

MODES = ("enforce", "warn")


class LimitsError(ValueError):
    """A limits document or decision override that cannot be used; the message names the field."""


_UNSET: Any = object()


def _where(where: str, key: str) -> str:
    return f"{where}.{key}"


def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping:
    if not isinstance(value, Mapping):
        raise LimitsError(f"{where}: want a mapping with keys {', '.join(allowed)}, got {value!r}")
    for key in value:
        if key not in allowed:
            raise LimitsError(f"{_where(where, str(key))}: unknown field (allowed: {', '.join(allowed)})")
    return value


def _whole(value: Any, where: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise LimitsError(f"{where}: want a whole number >= 1, got {value!r}")
    if value < 1:
        raise LimitsError(f"{where}: want a whole number >= 1, got {value!r}")
    return int(value)


def _mode(value: Any, where: str) -> str:
    if value not in MODES:
        raise LimitsError(f"{where}: want enforce or warn, got {value!r}")
    return value


def parse_rate_spec(value: Any, where: str, *, modes: bool = True) -> Rate | Windows | None:
    """One limit: a window, or a list of windows all checked at once, or null/unlimited.

    A window: ``"10/s"`` | ``{rate: "10/s", burst: 20}`` | ``{requests: 10, per: 1s, burst: 20}``.
    Several: ``[{rate: 10/s, burst: 20}, 600/min, 20000/day]``, or
    ``{windows: [...], mode: warn}``. ``mode`` (enforce | warn) may also sit beside a single
    window's ``rate``; ``modes=False`` (a decision's own limits) refuses it."""
    if value is None or value == "unlimited":
        return None
    if isinstance(value, list):
        return _windows(value, where, None)
    if isinstance(value, Mapping) and ("windows" in value or "mode" in value):
        if not modes:
            raise LimitsError(f"{where}: a decision's limits take no mode or windows key; "
                              f"give a list of windows instead")
        mode = _mode(value["mode"], _where(where, "mode")) if "mode" in value else None
        if "windows" in value:
            spec = _mapping(value, where, ("windows", "mode"))
            if not isinstance(spec["windows"], list):
                raise LimitsError(f"{_where(where, 'windows')}: want a list of windows such as "
                                  f"[{{rate: 10/s, burst: 20}}, 600/min], got {spec['windows']!r}")
            return _windows(spec["windows"], _where(where, "windows"), mode)
        rest = {k: v for k, v in value.items() if k != "mode"}
        one = _rate_window(rest, where)
        return None if one is None else Windows((one,), mode)
    return _rate_window(value, where)


def _windows(items: list, where: str, mode: str | None) -> Windows | None:
    if not items:
        raise LimitsError(f"{where}: want at least one window (or null for no limit)")
    rates = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if item is None or item == "unlimited":
            raise LimitsError(f"{at}: a window cannot be unlimited (drop it, or make the limit null)")
        if isinstance(item, Mapping) and ("units" in item or "window" in item):
            raise LimitsError(f"{at}: units/window is a budget's window; a rate window is "
                              f"{{rate: 20000/day}} (or give it under budget:)")
        r = _rate_window(item, at)
        if r is None:
            raise LimitsError(f"{at}: a window cannot be unlimited (drop it, or make the limit null)")
        rates.append(r)
    try:
        w = Windows(rates, mode)
    except ValueError as e:
        raise LimitsError(f"{where}: {e}") from None
    return w


def _rate_window(value: Any, where: str) -> Rate | None:
    """``"10/s"`` | ``{rate: "10/s", burst: 20}`` | ``{requests: 10, per: 1s, burst: 20}`` | null/unlimited."""

    if value is None or value == "unlimited":
        return None
    if isinstance(value, str):
        try:
            return Rate.parse(value)
        except ValueError as e:
            raise LimitsError(f"{where}: {e}") from None
    spec = _mapping(value, where, ("rate", "requests", "per", "burst"))
    burst = _whole(spec["burst"], _where(where, "burst")) if spec.get("burst") is not None else None
    if "rate" in spec:
        if "requests" in spec or "per" in spec:
            raise LimitsError(f"{where}: give either rate or requests+per, not both")
        if spec["rate"] is None or spec["rate"] == "unlimited":
            return None
        if not isinstance(spec["rate"], str):
            raise LimitsError(f"{_where(where, 'rate')}: want REQUESTS/PERIOD such as 10/s, "
                              f"got {spec['rate']!r}")
        try:
            return Rate.parse(spec["rate"], burst)
        except ValueError as e:
            raise LimitsError(f"{_where(where, 'rate')}: {e}") from None
    if "requests" not in spec:
        raise LimitsError(f"{where}: missing rate (such as 10/s) or requests+per")
    requests = _whole(spec["requests"], _where(where, "requests"))
    try:
        per = parse_duration(spec.get("per", 1))
    except ValueError as e:
        raise LimitsError(f"{_where(where, 'per')}: {e}") from None
    return Rate(requests, per, burst)


def parse_budget_spec(value: Any, where: str, *, modes: bool = True) -> Budget | BudgetWindows | None:
    """``{units: 1000, window: 1d}`` (window defaults to 1d), a list of such windows
    all charged at once, ``{windows: [...], mode: warn}``, ``{units, window, mode}``,
    or null/unlimited."""
    if value is None or value == "unlimited":
        return None
    mode = None
    if isinstance(value, Mapping) and ("windows" in value or "mode" in value):
        if not modes:
            raise LimitsError(f"{where}: a decision's budget takes no mode or windows key; "
                              f"give a list of windows instead")
        mode = _mode(value["mode"], _where(where, "mode")) if "mode" in value else None
        if "windows" in value:
            spec = _mapping(value, where, ("windows", "mode"))
            items = spec["windows"]
            if not isinstance(items, list):
                raise LimitsError(f"{_where(where, 'windows')}: want a list such as "
                                  f"[{{units: 100, window: 1h}}, {{units: 1000, window: 1d}}], got {items!r}")
            return _budget_windows(items, _where(where, "windows"), mode)
        value = {k: v for k, v in value.items() if k != "mode"}
        one = _budget_window(value, where)
        return BudgetWindows((one,), mode)
    if isinstance(value, list):
        return _budget_windows(value, where, None)
    return _budget_window(value, where)


def _budget_windows(items: list, where: str, mode: str | None) -> BudgetWindows:
    if not items:
        raise LimitsError(f"{where}: want at least one window (or null for no budget)")
    ws = [_budget_window(item, f"{where}[{i}]") for i, item in enumerate(items)]
    try:
        return BudgetWindows(ws, mode)
    except ValueError as e:
        raise LimitsError(f"{where}: {e}") from None


def _budget_window(value: Any, where: str) -> Budget:

    spec = _mapping(value, where, ("units", "window"))
    if "units" not in spec:
        raise LimitsError(f"{_where(where, 'units')}: missing (a number > 0)")
    units = spec["units"]
    if isinstance(units, bool) or not isinstance(units, (int, float)) or not 0 < units < float("inf"):
        raise LimitsError(f"{_where(where, 'units')}: want a number > 0, got {units!r}")
    try:
        window = parse_duration(spec.get("window", "1d"))
    except ValueError as e:
        raise LimitsError(f"{_where(where, 'window')}: {e}") from None
    return Budget(units, window)


class EffectiveLimits:
    """One call's limits; None in a field means unlimited. ``agent_warn``, ``tool_warn``,
    ``budget_warn``: that limit is in warn mode (a refusal is reported, the call runs)."""

    __slots__ = ("agent", "tool", "budget", "agent_warn", "tool_warn", "budget_warn")

    def __init__(self, agent, tool, budget, agent_warn: bool = False, tool_warn: bool = False,
                 budget_warn: bool = False) -> None:
        self.agent = agent
        self.tool = tool
        self.budget = budget
        self.agent_warn = agent_warn
        self.tool_warn = tool_warn
        self.budget_warn = budget_warn

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, EffectiveLimits) and self.agent == other.agent
                and self.tool == other.tool and self.budget == other.budget
                and (self.agent_warn, self.tool_warn, self.budget_warn)
                == (other.agent_warn, other.tool_warn, other.budget_warn))

    def __repr__(self) -> str:
        warn = [n for n, w in (("agent", self.agent_warn), ("tool", self.tool_warn),
                               ("budget", self.budget_warn)) if w]
        w = f", warn={warn}" if warn else ""
        return f"EffectiveLimits(agent={self.agent!r}, tool={self.tool!r}, budget={self.budget!r}{w})"


class _AgentLimits:
    __slots__ = ("agent", "budget", "tools", "mode")

    def __init__(self, agent, budget, tools: dict, mode: str | None = None) -> None:
        self.agent = agent
        self.budget = budget
        self.tools = tools
        self.mode = mode


class LimitsTable:
    """The compiled limits document. Build with ``compile_limits``. ``mode``: the
    document's ``mode`` (enforce | warn), the default of every limit in it."""

    __slots__ = ("agent", "tool", "budget", "tools", "agents", "mode")

    def __init__(self, agent=None, tool=None, budget=None, tools: dict | None = None,
                 agents: dict[str, _AgentLimits] | None = None, mode: str = "enforce") -> None:
        self.agent = agent
        self.tool = tool
        self.budget = budget
        self.tools = tools or {}
        self.agents = agents or {}
        self.mode = mode


def _tools(value: Any, where: str) -> dict[str, Rate | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LimitsError(f"{where}: want a mapping of tool name to rate, got {value!r}")
    return {str(name): parse_rate_spec(spec, _where(where, str(name))) for name, spec in value.items()}


def compile_limits(doc: Mapping | None, where: str = "limits") -> LimitsTable:
    """Validate and compile the limits document once (at load/reload), never per call."""
    if doc is None:
        return LimitsTable()
    doc = _mapping(doc, where, ("mode", "defaults", "tools", "agents"))
    d = doc.get("defaults") or {}
    dw = _where(where, "defaults")
    d = _mapping(d, dw, ("agent", "tool", "budget"))
    table = LimitsTable(
        agent=parse_rate_spec(d.get("agent"), _where(dw, "agent")),
        tool=parse_rate_spec(d.get("tool"), _where(dw, "tool")),
        budget=parse_budget_spec(d.get("budget"), _where(dw, "budget")),
        tools=_tools(doc.get("tools"), _where(where, "tools")),
        mode=_mode(doc["mode"], _where(where, "mode")) if "mode" in doc else "enforce",
    )
    agents = doc.get("agents") or {}
    aw = _where(where, "agents")
    if not isinstance(agents, Mapping):
        raise LimitsError(f"{aw}: want a mapping of agent id to limits, got {agents!r}")
    for agent_id, entry in agents.items():
        ew = _where(aw, str(agent_id))
        entry = _mapping(entry if entry is not None else {}, ew, ("mode", "agent", "budget", "tools"))
        table.agents[str(agent_id)] = _AgentLimits(
            parse_rate_spec(entry["agent"], _where(ew, "agent")) if "agent" in entry else table.agent,
            parse_budget_spec(entry["budget"], _where(ew, "budget")) if "budget" in entry else table.budget,
            _tools(entry.get("tools"), _where(ew, "tools")),
            _mode(entry["mode"], _where(ew, "mode")) if "mode" in entry else None,
        )
    return table


def parse_override(override: Mapping, where: str = "decision.limits") -> tuple[Any, Any, Any]:
    """The decision's ``limits``: (agent, tool, budget), each a spec, None, or _UNSET (absent)."""
    o = _mapping(override, where, ("agent", "tool", "budget"))
    return (
        parse_rate_spec(o["agent"], _where(where, "agent"), modes=False) if "agent" in o else _UNSET,
        parse_rate_spec(o["tool"], _where(where, "tool"), modes=False) if "tool" in o else _UNSET,
        parse_budget_spec(o["budget"], _where(where, "budget"), modes=False) if "budget" in o else _UNSET,
    )


def decision_limits(override: Mapping, where: str = "decision.limits"
                    ) -> tuple[Rate | None, Rate | None, Budget | None] | None:
    """The decision's ``limits`` as limits to check *in addition* to the data's, or None.

    This is what the pipeline applies (engines/decision.py compiles it once per decision;
    the ratelimit stage checks it after the policy): each given spec is one more limit on
    keys of its own; ``null``, ``unlimited`` and absent add nothing. ``resolve_limits``
    below is the pure precedence view ("what would this agent's limits be"), kept for tools
    and tests; a decision cannot lift a data limit that has already been checked.
    """
    parts = tuple(None if p is _UNSET else p for p in parse_override(override, where))
    return None if parts == (None, None, None) else parts  # type: ignore[return-value]


def _route_of(tool: str | None, tools: Mapping) -> str | None:
    """An MCP call's key is "route/tool": without an entry of its own, the route's limits apply."""
    if tool is not None and tool not in tools and "/" in tool:
        return tool.split("/", 1)[0]
    return tool


def resolve_limits(table: LimitsTable, agent: str, tool: str | None,
                   override: Mapping | None = None) -> EffectiveLimits:
    """The limits for one call. Pure; raises LimitsError (naming decision.limits.*) on a bad override."""
    a = table.agents.get(agent)
    mode = table.mode if a is None or a.mode is None else a.mode
    if a is None:
        agent_rate = table.agent
        budget = table.budget
        tool_rate = table.tools.get(_route_of(tool, table.tools), table.tool) if tool is not None else None
    else:
        agent_rate = a.agent
        budget = a.budget
        if tool is None:
            tool_rate = None
        else:
            tool_rate = a.tools.get(tool if tool in a.tools else _route_of(tool, a.tools), _UNSET)
            if tool_rate is _UNSET:
                tool_rate = table.tools.get(_route_of(tool, table.tools), table.tool)
    if override:
        o_agent, o_tool, o_budget = parse_override(override)
        if o_agent is not _UNSET:
            agent_rate = o_agent
        if o_tool is not _UNSET and tool is not None:
            tool_rate = o_tool
        if o_budget is not _UNSET:
            budget = o_budget
    # A limit's own mode, else the agent's, else the document's.
    return EffectiveLimits(agent_rate, tool_rate, budget,
                           (agent_rate.mode or mode) == "warn" if agent_rate is not None else False,
                           (tool_rate.mode or mode) == "warn" if tool_rate is not None else False,
                           (budget.mode or mode) == "warn" if budget is not None else False)
