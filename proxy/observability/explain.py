"""Which Rego rules produced a decision: the rule locations behind its reasons.

Asked only for the calls `observability.explain` selects (by default the ones
the policy denied), after the call has been answered: the input document is
built again from the call, and evaluated a second time with instrumentation:

- embedded (regorus): on a clone of the serving bundle with coverage on. A rule
  fired when its head line was covered and one of its bodies (the rule's, an `else`)
  left no line uncovered (regorus marks the head once a body has succeeded).
- opa: `POST /v1/data/<decision>?explain=full&pretty=true`; the rules the trace
  shows exiting are the rules that produced a value. Asked in the background;
  the trace shows `"state": "pending"` until OPA has answered.

A reason is linked to the fired rules whose string literals match it (a
`sprintf` template such as "Agent '%s' may not ..." matches the sentence it
made). The serving engine and its memo are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import orjson

from ..engines.decision import EngineError
from ..engines.embedded import project, ref_parts

log = logging.getLogger("regate.observability")

# Input documents larger than this are not kept in the trace (their hash and size are).
MAX_INPUT_BYTES = 16 << 10
MAX_RULES = 64
_VERB = re.compile(r"%[-+# 0]*\d*(?:\.\d+)?[vTtbcdoOqxXUeEfFgGsp]")
_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"|`([^`]*)`')


def _template(literal: str) -> re.Pattern[str] | None:
    """A regular expression for the sentences a (sprintf) string literal can make."""
    parts = _VERB.split(literal.replace("%%", "\x00"))
    fixed = sum(len(p) for p in parts)
    if fixed < 8:  # "%s", "x" and the like match anything: no evidence
        return None
    pattern = "(?s:.*?)".join(re.escape(p).replace("\x00", "%") for p in parts)
    return re.compile(pattern)


def link_reasons(reasons: list[str], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each reason, the fired rules whose literals could have produced it."""
    out = []
    for reason in reasons:
        where = []
        for rule in rules:
            for pat in rule.get("_patterns", ()):
                if pat.fullmatch(reason):
                    where.append({"rule": rule["rule"], "location": rule["location"]})
                    break
        out.append({"reason": reason, "rules": where})
    return out


def _public(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rules[:MAX_RULES]]


class _Explainer:
    """What both engines share: choosing calls, rebuilding their input."""

    def __init__(self, mode: str, policy: Any) -> None:
        self.mode = mode
        self.every = mode == "all"
        self.policy = policy  # the PolicyStage: it builds input documents

    def wants(self, call: Any) -> bool:
        if self.mode == "all":
            return call.decision is not None
        rejection = call.rejection
        return call.shadow_denied or (rejection is not None and rejection.code == "policy_denied")

    def input_document(self, call: Any) -> dict[str, Any]:
        doc = self.policy.input_document(call)
        # The clock as the policy saw it: the moment the policy stage began.
        start = call.started_ns
        marks = call.marks or [()]
        for name, t in zip(marks[0], marks[1:]):
            if name == "policy":
                break
            start = t
        doc["time_ns"] = time.time_ns() - (time.perf_counter_ns() - start)
        return doc

    async def close(self) -> None:
        return None


class RegorusExplainer(_Explainer):
    engine_name = "embedded"

    def __init__(self, mode: str, policy: Any, engine: Any) -> None:
        super().__init__(mode, policy)
        self.engine = engine
        self._for: Any = None  # the CompiledBundle the clone below was made from
        self._clone: Any = None
        self._rules: dict[str, list[dict[str, Any]]] = {}

    def _prepare(self, compiled: Any) -> None:
        if self._for is compiled:
            return
        clone = compiled.engine.clone()
        clone.set_enable_coverage(True)
        self._rules = rule_index(orjson.loads(clone.get_ast_as_json()))
        self._clone = clone
        self._for = compiled

    def explain(self, call: Any) -> dict[str, Any]:
        try:
            compiled = self.engine.compiled
        except EngineError:
            return {"engine": "embedded", "error": "the engine is not started"}
        if call.revision is not None and compiled.revision != call.revision:
            return {"engine": "embedded", "error": f"the policy was reloaded ({call.revision} -> "
                                                   f"{compiled.revision}) before the call could be explained"}
        try:
            # What the engine evaluated: the input cut down to the paths the policy reads.
            text = orjson.dumps(project(self.input_document(call), compiled.projection)).decode()
            self._prepare(compiled)
            clone = self._clone
            clone.clear_coverage_data()
            clone.set_input_json(text)
            clone.eval_rule_as_json(compiled.rule)
            report = orjson.loads(clone.get_coverage_report_as_json())
        except Exception as exc:  # noqa: BLE001 - explaining must never fail a call
            return {"engine": "embedded", "error": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
        rules = fired_rules(self._rules, report)
        reasons = call.rejection.reasons if call.rejection is not None else (
            call.decision.reasons if call.decision is not None else [])
        return {
            "engine": "embedded",
            "method": "coverage",
            "reasons": link_reasons(list(reasons), rules),
            "rules": _public(rules),
            "input": orjson.loads(text) if len(text) <= MAX_INPUT_BYTES else None,
            "input_bytes": len(text),
            "note": "evaluated again after the call, on the same revision, with the input the policy read",
        }


def rule_index(ast: list[dict]) -> dict[str, list[dict[str, Any]]]:
    """Per file: every rule with its name, kind, head line, line range and literal templates."""
    out: dict[str, list[dict[str, Any]]] = {}
    for module in ast:
        source = module["source"]
        path = source["file"]
        if path.endswith("_test.rego"):
            continue
        contents: str = source["contents"]
        raw = contents.encode()
        pkg = _ref_name(module["ast"]["package"]["refr"]) or "?"
        rules = out.setdefault(path, [])
        for node in module["ast"]["rules"]:
            kind, body = next(iter(node.items()))
            if kind != "Spec":
                continue  # defaults are what is left when no rule fires
            span = body["span"]
            first = span["line"]
            last = first + raw[span["start"]:span["end"]].count(b"\n")
            head_kind, head = next(iter(body["head"].items()))
            # Each body (the rule's, then each `else`): the lines of its query.
            bodies = []
            for b in body.get("bodies") or ():
                q = (b.get("query") or {}).get("span")
                if q:
                    bodies.append((q["line"], q["line"] + raw[q["start"]:q["end"]].count(b"\n")))
            name = _ref_name(head.get("refr")) or "?"
            text = raw[span["start"]:span["end"]].decode("utf-8", "replace")
            patterns = []
            for m in _STRING.finditer(text):
                lit = m.group(2) if m.group(2) is not None else _unescape(m.group(1))
                pat = _template(lit)
                if pat is not None:
                    patterns.append(pat)
            rules.append({
                "rule": f"data.{pkg}.{name}",
                "kind": {"Set": "set", "Compr": "value", "Func": "function"}.get(head_kind, head_kind.lower()),
                "location": f"{path}:{first}",
                "lines": [first, last],
                "_head": first,
                "_bodies": bodies or [(first, last)],
                "_patterns": patterns,
            })
    return out


def fired_rules(index: dict[str, list[dict[str, Any]]], report: dict) -> list[dict[str, Any]]:
    fired = []
    for f in report.get("files", []):
        covered = set(f.get("covered", ()))
        uncovered = set(f.get("not_covered", ()))
        for rule in index.get(f["path"], ()):
            # regorus covers the head once a body has succeeded; a body whose
            # query left a line uncovered stopped before its end.
            if rule["_head"] not in covered:
                continue
            if all(any(a <= ln <= b for ln in uncovered) for a, b in rule["_bodies"]):
                continue
            fired.append(rule)
    fired.sort(key=lambda r: (r["location"].rsplit(":", 1)[0], r["lines"][0]))
    return fired


def _unescape(s: str) -> str:
    try:
        return orjson.loads(f'"{s}"')
    except orjson.JSONDecodeError:
        return s


def _ref_name(node: Any) -> str | None:
    """`data.regate.tools.shell.deny` for a rule or package ref; a dynamic part is `[_]`."""
    if not isinstance(node, dict):
        return None
    root, parts, _ = ref_parts(node)
    if root is None:
        return None
    return ".".join([root, *(p if p is not None else "[_]" for p in parts)])


class OpaExplainer(_Explainer):
    """Asks the OPA server for `explain=full` in the background."""

    engine_name = "opa"

    def __init__(self, mode: str, policy: Any, engine: Any, token: str | None = None,
                 timeout_s: float = 2.0) -> None:
        super().__init__(mode, policy)
        self.url = f"{engine.url}/v1/data/{engine.decision}?explain=full&pretty=true"
        self.token = token
        self.timeout_s = timeout_s
        self._session: Any = None
        self._tasks: set[asyncio.Task] = set()
        # Explanations can be slow and large: at most this many in flight; the rest are skipped.
        self.max_in_flight = 8

    def explain(self, call: Any) -> dict[str, Any]:
        result: dict[str, Any] = {"engine": "opa", "method": "explain=full", "state": "pending"}
        if len(self._tasks) >= self.max_in_flight:
            # NOTE: deliberately lossy: a flood of denials must not become a flood of
            # explain queries at OPA; the trace says this one was skipped.
            result.update(state="skipped", error="too many explanations in flight")
            return result
        reasons = call.rejection.reasons if call.rejection is not None else (
            call.decision.reasons if call.decision is not None else [])
        doc = self.input_document(call)
        task = asyncio.ensure_future(self._ask(doc, list(reasons), result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return result

    async def _ask(self, doc: dict, reasons: list[str], result: dict[str, Any]) -> None:
        import aiohttp

        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            async with self._session.post(self.url, data=orjson.dumps({"input": doc}), headers=headers) as r:
                body = orjson.loads(await r.read())
                if r.status != 200:
                    raise RuntimeError(f"OPA answered {r.status}")
        except Exception as exc:  # noqa: BLE001 - an explanation is best effort
            result.update(state="error", error=f"{exc.__class__.__name__}: {str(exc)[:300]}")
            return
        events = body.get("explanation") if isinstance(body, dict) else None
        if not isinstance(events, list):
            result.update(state="done", rules=[], reasons=link_reasons(reasons, []),
                          note="the OPA server returned no explanation (is ?explain supported there?)")
            return
        rules = opa_fired_rules(events)
        result.update(state="done", rules=_public(rules), reasons=link_reasons(reasons, rules))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


_PRETTY = re.compile(r"^(?P<loc>\S+:\d+)\s+(?:\|\s*)*(?P<op>[A-Z][a-z]+)\s+(?P<node>.*)$")
_RULE_HEAD = re.compile(r"^(?:default\s+)?(?P<name>[A-Za-z_][\w.]*(?:\[[^\]]*\])?)\s*(?:contains\b|:=|=|if\b|\()")


def opa_fired_rules(events: list[Any]) -> list[dict[str, Any]]:
    """The rules OPA's trace shows exiting (producing a value), once each, by location.

    Takes either shape OPA writes: raw events (`{"op": "exit", "type": "rule",
    "node": {...rule...}, "location": ...}`, the node or location possibly as
    text) or the pretty trace (`explain=full&pretty=true`: lines such as
    `rego/x.rego:23   | | Exit deny contains msg if { ... }`).
    """
    seen: dict[str, dict[str, Any]] = {}
    for ev in events:
        if isinstance(ev, str):
            m = _PRETTY.match(ev.strip())
            if m is None:
                continue
            op, node, loc = m.group("op"), m.group("node"), m.group("loc")
            kind = None
        elif isinstance(ev, dict):
            op, node, loc, kind = str(ev.get("op", "")), ev.get("node"), ev.get("location"), ev.get("type")
        else:
            continue
        if op.lower() != "exit":
            continue
        if isinstance(node, dict):
            if kind not in (None, "rule") or "head" not in node:
                continue
            head = node["head"]
            name = head.get("name") or ".".join(
                str(t.get("value")) for t in head.get("ref", []) if isinstance(t, dict)) or "?"
            literals = _strings(node)
            loc = loc or node.get("location")
        elif isinstance(node, str):
            # A rule prints as its head and body ("deny contains x if { ... }"); an expression does not.
            if kind not in (None, "rule") or (" if {" not in node and not node.startswith("default ")):
                continue
            m = _RULE_HEAD.match(node)
            name = m.group("name") if m else node.split(" ", 1)[0]
            literals = [m.group(2) if m.group(2) is not None else _unescape(m.group(1)) for m in _STRING.finditer(node)]
        else:
            continue
        if isinstance(loc, dict):
            where = f"{loc.get('file', '?')}:{loc.get('row', '?')}"
        else:
            where = str(loc) if loc else f"?:{name}"
        if ":" not in where or where.startswith("data.") or where in seen:
            continue  # the query itself ("data.regate.decision"), or a rule already listed
        seen[where] = {
            "rule": name,
            "location": where,
            "_patterns": [p for p in (_template(lit) for lit in literals) if p is not None],
        }
    return list(seen.values())


def _strings(node: Any) -> list[str]:
    out: list[str] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            if cur.get("type") == "string" and isinstance(cur.get("value"), str):
                out.append(cur["value"])
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return out


def build_explainer(mode: str, engine: Any, policy: Any, opa_token: str | None = None) -> Any:
    if mode == "off" or policy is None:
        return None
    name = getattr(engine, "name", None)
    if name == "embedded":
        return RegorusExplainer(mode, policy, engine)
    if name == "opa":
        return OpaExplainer(mode, policy, engine, token=opa_token)
    return None
