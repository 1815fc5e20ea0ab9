"""Which Rego rules produced a decision: the rule locations behind its reasons.

Asked only for the calls `observability.explain` selects (by default the ones
the policy denied), after the call has been answered: the input document is
built again from the call, and evaluated a second time with instrumentation:

- embedded (regorus): on a clone of the serving bundle with coverage on. A rule
  fired when its head line was covered and one of its bodies (the rule's, an `else`)
  left no line uncovered (regorus marks the head once a body has succeeded).
- opa: `POST /v1/data/<decision>?explain=full&pretty=true`; the rule
  definitions the trace shows exiting are the ones that produced a value, at
  the `file:row` OPA prints (its JSON trace has no locations); their literals
  come from the source OPA serves (`GET /v1/policies`). Asked in the
  background; the trace shows `"state": "pending"` until OPA has answered.

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


def _warned(call: Any) -> dict[str, Any]:
    """What limits and breakers in warn mode would have refused (they let the call run)."""
    warned = call.extra.get("would_refuse") if call.extra else None
    return {"would_refuse": [dict(w) for w in warned]} if warned else {}


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
        reasons = (call.extra.get("operator_reasons") or call.rejection.reasons) if call.rejection is not None else (
            call.decision.reasons if call.decision is not None else [])
        return {
            "engine": "embedded",
            "method": "coverage",
            "reasons": link_reasons(list(reasons), rules),
            "rules": _public(rules),
            "input": orjson.loads(text) if len(text) <= MAX_INPUT_BYTES else None,
            "input_bytes": len(text),
            "note": "evaluated again after the call, on the same revision, with the input the policy read",
            **_warned(call),
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
    """Asks the OPA server for `explain=full&pretty=true` in the background.

    What OPA v1 gives: its JSON trace (`explain=full`) carries no locations at
    all, and its pretty trace gives every event's `file:row` and, for a rule,
    its path (`Exit data.regate.tools.shell.refusals` at the row of that
    definition's head, or of its `else`) but not its body. So the rules and
    their locations come from the pretty trace, and the string literals that
    link a reason to its rule from the source OPA serves (`GET /v1/policies`,
    fetched once per revision). Where OPA refuses that (authorization), the
    rules are still listed, the reasons are left unlinked, and `note` says why.
    """

    engine_name = "opa"
    method = "explain=full&pretty=true"

    def __init__(self, mode: str, policy: Any, engine: Any, token: str | None = None,
                 timeout_s: float = 2.0) -> None:
        super().__init__(mode, policy)
        self.engine = engine
        # strict-builtin-errors as on the decision itself: the same evaluation, traced.
        self.url = f"{engine.url}/v1/data/{engine.decision}?explain=full&pretty=true&strict-builtin-errors=true"
        self.policies_url = f"{engine.url}/v1/policies"
        self.token = token
        self.timeout_s = timeout_s
        self._session: Any = None
        self._tasks: set[asyncio.Task] = set()
        # The module sources OPA serves, by policy id, and the revision they were read at.
        self._sources: dict[str, str] | None = None
        self._sources_for: str | None = None
        # Explanations can be slow and large: at most this many in flight; the rest are skipped.
        self.max_in_flight = 8

    def explain(self, call: Any) -> dict[str, Any]:
        result: dict[str, Any] = {"engine": "opa", "method": self.method, "state": "pending", **_warned(call)}
        if len(self._tasks) >= self.max_in_flight:
            # NOTE: deliberately lossy: a flood of denials must not become a flood of
            # explain queries at OPA; the trace says this one was skipped.
            result.update(state="skipped", error="too many explanations in flight")
            return result
        reasons = (call.extra.get("operator_reasons") or call.rejection.reasons) if call.rejection is not None else (
            call.decision.reasons if call.decision is not None else [])
        doc = self.input_document(call)
        task = asyncio.ensure_future(self._ask(doc, list(reasons), result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return result

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _ask(self, doc: dict, reasons: list[str], result: dict[str, Any]) -> None:
        import aiohttp

        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            async with self._session.post(self.url, data=orjson.dumps({"input": doc}), headers=self._headers()) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"OPA answered {r.status}: {raw[:200].decode('utf-8', 'replace')}")
                body = orjson.loads(raw)
        except Exception as exc:  # noqa: BLE001 - an explanation is best effort
            result.update(state="error", error=f"{exc.__class__.__name__}: {str(exc)[:300]}")
            return
        events = body.get("explanation") if isinstance(body, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            result.update(state="done", rules=[], reasons=link_reasons(reasons, []),
                          note="the OPA server returned no pretty explanation (is ?explain=full&pretty "
                               "supported there?)")
            return
        rules = opa_fired_rules(events)
        sources, why = await self._policy_sources({r["_file"] for r in rules})
        if sources is not None:
            add_sources(rules, sources)
        note = ("rules and locations from OPA's pretty trace (OPA's JSON trace carries no locations); "
                "reasons linked through the rule source OPA serves (GET /v1/policies)")
        if why:
            note = (f"rules and locations from OPA's pretty trace; the reasons are not linked to rules: "
                    f"{why}, and OPA's trace alone does not say which rule made which sentence "
                    "(nor the whole of a long file path: OPA's trace writes part of it as '...')")
        result.update(state="done", rules=_public(rules), reasons=link_reasons(reasons, rules), note=note)

    async def _policy_sources(self, files: set[str]) -> tuple[dict[str, str] | None, str]:
        """The source of each module OPA serves, by policy id; (None, why) when OPA does not say."""
        revision = getattr(self.engine, "revision", None)
        cached = self._sources
        if (cached is not None and self._sources_for == revision
                and all(_source_of(cached, f) is not None for f in files)):
            return cached, ""
        try:
            async with self._session.get(self.policies_url, headers=self._headers()) as r:
                raw = await r.read()
                if r.status != 200:
                    return None, f"GET /v1/policies answered {r.status}"
                body = orjson.loads(raw)
            sources = {m["id"]: m["raw"] for m in body.get("result", ())
                       if isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("raw"), str)}
        except Exception as exc:  # noqa: BLE001 - an explanation is best effort
            return None, f"GET /v1/policies failed ({exc.__class__.__name__}: {str(exc)[:200]})"
        self._sources, self._sources_for = sources, revision
        return sources, ""

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


# One line of OPA's pretty trace: `<file:row or query:1>  | | <Op> <node>`.
_PRETTY = re.compile(r"^(?P<loc>\S+)\s+(?P<depth>(?:\|\s)*)(?P<op>[A-Z][a-z]+)\s(?P<node>.*)$")
_RULE_PATH = re.compile(r"^data\.\S+$")
_LOC = re.compile(r"^(?P<file>.+):(?P<row>\d+)$")


def opa_fired_rules(lines: list[str]) -> list[dict[str, Any]]:
    """The rule definitions OPA's pretty trace shows exiting (producing a value), once each.

    A rule is entered and exited as its path (`Enter data.regate.deny`), at the
    row of the definition that OPA evaluates (each `deny contains ...` and each
    `else` is its own). The body of a `not` or a comprehension is entered as its
    expression and evaluated as the same text next (`Enter data.x.plain`,
    `Eval data.x.plain`): those are not rules, even when the text is a path.
    """
    events = []
    for line in lines:
        m = _PRETTY.match(line.rstrip())
        if m is not None:
            events.append((m.group("loc"), m.group("depth").count("|"), m.group("op"), m.group("node")))
    rule_enters: set[tuple[str, str]] = set()
    for i, (loc, depth, op, node) in enumerate(events):
        if op != "Enter" or not _RULE_PATH.match(node):
            continue
        nxt = events[i + 1] if i + 1 < len(events) else None
        if nxt is not None and nxt[1] == depth + 1 and nxt[2] == "Eval" and nxt[3] == node:
            continue  # the body of a `not` / comprehension, not a rule
        rule_enters.add((loc, node))
    seen: dict[str, dict[str, Any]] = {}
    for loc, _, op, node in events:
        if op != "Exit":
            continue
        node = node.removesuffix(" early")
        m = _LOC.match(loc)
        if m is None or m.group("file") == "query" or loc in seen or (loc, node) not in rule_enters:
            continue
        seen[loc] = {"rule": node, "location": loc, "_file": m.group("file"), "_row": int(m.group("row")),
                     "_patterns": []}
    return list(seen.values())


def _source_of(sources: dict[str, str], file: str) -> tuple[str, str] | None:
    """(the full file name, the source) of the module OPA names `file` in its trace.

    OPA's policy ids drop the leading "/" of an absolute path, and a bundle's
    module id is `<bundle>/rego/x.rego` where the trace says `/rego/x.rego`: the
    trace's name is the id, or a "/"-started tail of it. OPA's pretty trace also
    shortens long paths by writing "..." for a part they share
    (`/tmp/...-0/rego/x.rego`): such a name is the one tail it fits."""
    if file in sources:
        return file, sources[file]
    if "..." in file:
        head, _, rest = file.partition("...")
        pattern = re.compile(re.escape(head) + ".+" + re.escape(rest))
        fits = pattern.fullmatch
    else:
        fits = file.__eq__
    found: set[tuple[str, str]] = set()
    for pid, src in sources.items():
        path = pid if pid.startswith("/") else "/" + pid
        tails = [path[i:] for i, ch in enumerate(path) if ch == "/"]
        if not file.startswith("/"):
            tails += [t[1:] for t in tails]
        found.update((t, pid) for t in tails if fits(t))
    if len(found) != 1:
        return None
    name, pid = found.pop()
    return name, sources[pid]


def rule_text(source: str, row: int) -> str:
    """The text of the rule definition whose head is at `row`: up to the next line that
    starts a definition (column 0, not a closing bracket) or its `else`."""
    lines = source.splitlines()
    if not 1 <= row <= len(lines):
        return ""
    out = [lines[row - 1]]
    for line in lines[row:]:
        if line.startswith("}") and line[1:].lstrip().startswith("else"):
            break
        if line and not line[0].isspace() and line[0] not in "})]":
            break
        out.append(line)
    return "\n".join(out)


def add_sources(rules: list[dict[str, Any]], sources: dict[str, str]) -> None:
    """Each rule's full file name and its string literals, from the source OPA serves."""
    for rule in rules:
        found = _source_of(sources, rule["_file"])
        if found is None:
            continue
        name, source = found
        rule["location"] = f"{name}:{rule['_row']}"
        text = rule_text(source, rule["_row"])
        pats = (_template(m.group(2) if m.group(2) is not None else _unescape(m.group(1)))
                for m in _STRING.finditer(text))
        rule["_patterns"] = [p for p in pats if p is not None]


def build_explainer(mode: str, engine: Any, policy: Any, opa_token: str | None = None) -> Any:
    if mode == "off" or policy is None:
        return None
    name = getattr(engine, "name", None)
    if name == "embedded":
        return RegorusExplainer(mode, policy, engine)
    if name == "opa":
        return OpaExplainer(mode, policy, engine, token=opa_token)
    return None
