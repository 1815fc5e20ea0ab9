"""Conformance: the embedded engine (regorus) against real OPA, case by case.

Every case of tests/conformance/*.yaml is evaluated by the embedded engine
exactly as Regate runs it (bundle, input projection, JSON decoding), by the
real OPA binary the `opa` engine talks to (``opa eval`` on the case's files;
the shipped-bundle cases through one ``opa run --server``), and by OPA v1.20.2
in-process (opa-golib-python-bindings). Outcomes (a value, undefined, an
evaluation error, a bundle that does not load) must be identical, and match
the case's `expect` when it has one. Where regorus truly differs, the case
says so under `differs:` and this test asserts that exact difference, so it
fails the day any engine changes.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

from proxy.engines.bundle import Bundle, BundleError, load_bundle
from proxy.engines.decision import DecisionError, EngineError, normalise, parse_decision
from proxy.engines.embedded import UNDEFINED, EmbeddedEngine
from proxy.engines.opa import QUERY_PARAMS
from tests.support.opa_server import OpaMissing, OpaServer, opa_binary, shipped_paths

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "conformance"


def _cases() -> list[dict]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()):
            case["file"] = path.name
            cases.append(case)
    return cases


CASES = _cases()


def full_input(call: dict) -> dict:
    """The input document (README.md, "The input document") for a short `call:` of the corpus."""
    agent = {"claims": {}} if call.get("agent") is None else {"id": call["agent"], "claims": {"sub": call["agent"]}}
    return {
        "version": 1,
        "agent": agent,
        "tool": {"name": call["tool"], "route": f"/tools/{call['tool']}", "gpu": None},
        "request": {
            "method": call["method"],
            "path": call["path"],
            "query": {"trace": ["1"]},
            "headers": {"content-type": "application/json", "user-agent": "agent/1.0"},
            "body": call.get("body"),
            "body_sha256": "0" * 64,
            "size": 42,
        },
        "mcp": call.get("mcp"),
        "state": {"breaker": "closed", "recent_failures": 0, "budget_left": 40.0},
        "time_ns": 1767225600000000000,
    }


# --- outcomes: ("value", v) | ("undefined",) | ("error", msg) | ("load_error", msg)


def opa_outcome(bundle: Bundle, query: str, input_doc: Any, engine: OpaEngine | None = None) -> tuple:
    own = engine is None
    if engine is None:
        engine = OpaEngine()
    try:
        if own:
            for module in bundle.modules:
                engine.add_policy(module.name, module.source)
            if bundle.data:
                engine.add_data(bundle.data)
        value = engine.eval_document(query.replace("/", "."), input_doc)
    except OpaUndefinedError:
        return ("undefined",)
    except OpaError as exc:
        return ("error", f"{exc.code}: {exc.message}")
    finally:
        if own:
            engine.close()
    return ("value", normalise(value))


def opa_binary_outcome(bundle: Bundle, query: str, input_doc: Any, workdir: Path) -> tuple:
    """`opa eval` of the bundle's files, as `opa run` would load them."""
    for module in bundle.modules:
        path = workdir / module.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(module.source)
    if bundle.data:
        (workdir / "data.json").write_text(json.dumps(bundle.data))
    # --strict-builtin-errors: as the `opa` engine asks the server (proxy.engines.opa.QUERY_PARAMS).
    done = subprocess.run([opa_binary(), "eval", "--format", "json", "--strict-builtin-errors", "--data", str(workdir),
                           "--stdin-input", "data." + query.replace("/", ".")],
                          input=json.dumps(input_doc), capture_output=True, text=True, timeout=30)
    out = json.loads(done.stdout or "{}")
    if done.returncode != 0:
        errors = out.get("errors") or [{"code": "opa_eval", "message": done.stderr.strip()}]
        return ("error", "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors))
    if not out.get("result"):
        return ("undefined",)
    return ("value", normalise(out["result"][0]["expressions"][0]["value"]))


def opa_server_outcome(server: OpaServer, query: str, input_doc: Any) -> tuple:
    """The Data API answer of a real `opa run --server`, as the `opa` engine asks it."""
    req = urllib.request.Request(f"{server.url}/v1/data/{query}?{urlencode(QUERY_PARAMS)}", data=json.dumps({"input": input_doc}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        return ("error", f"{body.get('code')}: {body.get('message')}")
    return ("value", normalise(answer["result"])) if "result" in answer else ("undefined",)


def regorus_outcome(bundle: Bundle, query: str, input_doc: Any, engine: EmbeddedEngine | None = None) -> tuple:
    try:
        engine = engine or EmbeddedEngine.from_bundle(bundle, query, memo_size=0)
    except BundleError as exc:
        return ("load_error", str(exc))
    try:
        value = engine.evaluate_raw(input_doc)
    except EngineError as exc:
        return ("error", str(exc))
    return ("undefined",) if value is UNDEFINED else ("value", value)


def matches(outcome: tuple, spec: Any) -> bool:
    if spec == "undefined":
        return outcome == ("undefined",)
    (kind, want), = spec.items()
    if kind == "value":
        return outcome[0] == "value" and outcome[1] == want
    return outcome[0] == kind and want in outcome[1]


def same(a: tuple, b: tuple) -> bool:
    # Error texts differ between engines; that an error happened must not.
    return a[0] == b[0] and (a[0] not in ("value",) or a[1] == b[1])


def decision_of(outcome: tuple) -> dict | str:
    if outcome[0] != "value":
        return outcome[0]
    try:
        return parse_decision(outcome[1]).to_dict()
    except DecisionError as exc:
        return f"DecisionError: {exc}"


@pytest.fixture(scope="module", autouse=True)
def real_opa():
    try:
        return opa_binary()
    except OpaMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def shipped(real_opa):
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    opa = OpaEngine()
    for module in bundle.modules:
        opa.add_policy(module.name, module.source)
    opa.add_data(bundle.data)
    with OpaServer(*shipped_paths(ROOT / "rego", ROOT / "policies")) as server:
        yield bundle, opa, server, EmbeddedEngine.from_bundle(bundle, "regate/decision", memo_size=0), \
            EmbeddedEngine.from_bundle(bundle, "regate/decision")
    opa.close()


def test_corpus_is_big_enough_and_names_are_unique():
    names = [c["name"] for c in CASES]
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    assert sum(1 for c in CASES if c.get("bundle") == "shipped") >= 10
    for case in CASES:
        if "differs" in case:
            assert case["differs"].get("note"), f"{case['name']}: a difference needs a note saying what differs"


@pytest.mark.parametrize("case", [c for c in CASES if c.get("bundle") != "shipped"], ids=lambda c: c["name"])
def test_language_case(case, tmp_path):
    modules = {"t.rego": case["policy"], **case.get("modules", {})}
    bundle = Bundle.from_sources(modules, case.get("data"))
    query = case.get("query", "t/r")
    input_doc = case.get("input", {})
    opa = opa_binary_outcome(bundle, query, input_doc, tmp_path)
    golib = opa_outcome(bundle, query, input_doc)
    ours = regorus_outcome(bundle, query, input_doc)
    assert same(golib, opa), f"OPA v1.20.2 in-process {golib} != the opa binary {opa}"
    if "differs" in case:
        d = case["differs"]
        assert matches(opa, d["opa"]), f"OPA no longer behaves as documented: {opa}"
        assert matches(ours, d["regorus"]), f"regorus no longer behaves as documented: {ours}"
        return
    assert same(ours, opa), f"regorus {ours} != OPA {opa}"
    if "expect" in case:
        assert matches(opa, case["expect"]), f"OPA gave {opa}"


@pytest.mark.parametrize("case", [c for c in CASES if c.get("bundle") == "shipped"], ids=lambda c: c["name"])
def test_shipped_bundle_case(case, shipped):
    bundle, opa_engine, server, embedded, memoised = shipped
    input_doc = full_input(case["call"])
    opa = opa_server_outcome(server, "regate/decision", input_doc)
    golib = opa_outcome(bundle, "regate/decision", input_doc, opa_engine)
    ours = regorus_outcome(bundle, "regate/decision", input_doc, embedded)
    assert same(golib, opa), f"OPA v1.20.2 in-process {golib} != the opa server {opa}"
    assert same(ours, opa), f"regorus {ours} != OPA {opa}"
    want = decision_of(opa)
    assert decision_of(ours) == want
    # The serving path (projection, memo, Decision copy) gives the same decision, twice.
    for _ in range(2):
        assert memoised.compiled.decide(input_doc).to_dict() == want
    assert isinstance(want, dict) and want["allow"] is case["expect_allow"]
    if not want["allow"]:
        assert want["reasons"] and all(r.endswith(".") for r in want["reasons"])
