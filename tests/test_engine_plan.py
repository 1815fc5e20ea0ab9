"""The compiled fast path (proxy/engines/plan): OPA's plan compiled to Python.

Unit tests on small Rego (each compared with regorus on a set of inputs), the
load-time check refusing a bundle it cannot decide exactly, and the differential
test on the shipped bundle: 10,000 generated inputs, compiled vs regorus, and a
sample vs the real OPA (one ``opa eval`` over all of them), zero differences.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path

import orjson
import pytest

from proxy.engines.bundle import load_bundle
from proxy.engines.embedded import CompiledBundle
from proxy.engines.plan import PlanUnsupported, compile_fast_path, differential, same_answer
from proxy.engines.plan import runtime as rt
from proxy.engines.plan.inputs import generate
from tests.support.opa_server import opa_binary

ROOT = Path(__file__).resolve().parents[1]

import regorus  # noqa: E402


def _regorus(source: str, data: dict, rule: str):
    engine = regorus.Engine()
    engine.add_policy("t.rego", source)
    engine.add_data_json(json.dumps(data))

    def ev(text: str) -> str:
        engine.set_input_json(text)
        return engine.eval_rule_as_json(rule)
    return ev


def _agree(source: str, inputs: list, data: dict | None = None, rule: str = "data.t.r") -> list:
    """Compile ``rule``; every input decided by the compiled path must match regorus. The values."""
    data = data or {}
    fast = compile_fast_path([("t.rego", source)], json.dumps(data), rule, opa=opa_binary())
    ref = _regorus(source, data, rule)
    out = []
    for inp in inputs:
        text = json.dumps(inp)
        got = fast.eval_text(text)
        want = ref(text)
        assert got is not None, f"handed over: {inp}"
        assert same_answer(got, want), (inp, got, want)
        out.append(orjson.loads(got))
    return out


def test_undefined_is_not_true():
    src = "package t\n\nr if { x := input.missing; x }\n"
    assert _agree(src, [{}, {"missing": True}, {"missing": False}]) == ["<undefined>", True, "<undefined>"]


def test_default_else_and_not():
    src = """package t
default r := "none"
r := "a" if { input.x == 1 } else := "b" if { input.x == 2 } else := "c" if { not input.y }
"""
    got = _agree(src, [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 3, "y": True}, {}, {"x": 1.0}, {"x": True}])
    assert got == ["a", "b", "c", "none", "c", "a", "c"]


def test_every_and_comprehensions():
    src = """package t
r := {"all": ok, "sq": [y | some x in input.xs; x > 1; y := x * 1], "keys": {k | some k, _ in input.o},
      "n": count([1 | some _ in input.xs])} if { true }
default ok := false
ok if { every x in input.xs { x > 0 } }
"""
    # `x * 1` is a builtin the compiled path lacks: the plan is refused, and says why.
    with pytest.raises(PlanUnsupported, match="mul"):
        _agree(src, [{}])
    src = src.replace("y := x * 1", "y := x")
    got = _agree(src, [{"xs": [1, 2, 3], "o": {"b": 1, "a": 2}}, {"xs": [0, 5], "o": {}}, {"xs": [], "o": {}}])
    assert got[0] == {"all": True, "sq": [2, 3], "keys": ["a", "b"], "n": 3}
    assert got[1]["all"] is False and got[2]["all"] is True


def test_sets_partial_rules_and_data_by_reference():
    src = """package t
deny contains msg if { some g in input.groups; not data.ok[g]; msg := sprintf("%s is not ok", [g]) }
deny contains "empty" if { count(input.groups) == 0 }
r := {"allow": count(deny) == 0, "reasons": deny}
"""
    data = {"ok": {"a": True, "b": True}}
    got = _agree(src, [{"groups": ["a"]}, {"groups": ["c", "a", "z"]}, {"groups": []}], data)
    assert got == [{"allow": True, "reasons": []}, {"allow": False, "reasons": ["c is not ok", "z is not ok"]},
                   {"allow": False, "reasons": ["empty"]}]
    assert data == {"ok": {"a": True, "b": True}}


def test_with_is_handled_or_refused():
    src = """package t
inner if input.a == 1
r if { inner with input as {"a": 1} }
"""
    try:
        got = _agree(src, [{}, {"a": 2}])
    except PlanUnsupported:
        return  # refused: regorus decides
    assert got == [True, True]


def test_odd_input_is_handed_to_regorus():
    src = 'package t\nr := sprintf("%s", [input.x])\n'
    fast = compile_fast_path([("t.rego", src)], "{}", "data.t.r", opa=opa_binary())
    assert fast.eval_text('{"x": "a"}') == '"a"'
    assert fast.eval_text('{"x": 1.5}') is None  # a float in sprintf: regorus decides
    assert fast.fallbacks == 1


def test_conflicts_and_iterating_a_scalar_are_handed_to_regorus():
    fast = compile_fast_path([("t.rego", "package t\nr := 1 if input.a\nr := 2 if input.b\n")], "{}", "data.t.r",
                             opa=opa_binary())
    assert fast.eval_text('{"a": true}') == "1"
    assert fast.eval_text('{"a": true, "b": true}') is None  # OPA: eval_conflict_error
    src = "package t\nr if { some x in input.s; x == 1 }\n"
    assert _agree(src, [{"s": [1]}, {"s": {"k": 1}}, {"s": [2]}]) == [True, True, "<undefined>"]
    fast = compile_fast_path([("t.rego", src)], "{}", "data.t.r", opa=opa_binary())
    assert fast.eval_text('{"s": 5}') is None  # OPA: undefined; regorus: an error


def test_nondeterministic_builtins_are_refused():
    src = "package t\nr := time.now_ns()\n"
    with pytest.raises(PlanUnsupported, match="time.now_ns"):
        compile_fast_path([("t.rego", src)], "{}", "data.t.r", opa=opa_binary())


def test_regex_goes_through_re2_and_perl_classes_are_handed_over():
    assert rt.b_regex_match("^(?:a|b)+$", "abba") is True
    with pytest.raises(rt.Unsupported):
        rt.b_regex_match(r"\s", " ")
    with pytest.raises(rt.Unsupported):
        rt.b_regex_match("(a", "a")
    assert rt.b_regex_find_n("[0-9]", "a1b2c3", 2) == ["1", "2"]


def test_rego_equality():
    assert rt.eq(1, 1.0) and not rt.eq(1, True) and not rt.eq(0, False) and not rt.eq(None, False)
    assert rt.eq({"a": [1, {"b": 2}]}, {"a": [1.0, {"b": 2}]}) and not rt.eq([1], [1, 2])


# --- The shipped bundle ----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    cb = CompiledBundle(bundle, "regate/decision", memo_size=0)
    fast = compile_fast_path([(m.name, m.source) for m in bundle.modules if not m.is_test],
                             bundle.data_json, cb.rule, opa=opa_binary())
    return bundle, cb, fast


def test_shipped_bundle_differential_vs_regorus(shipped):
    _, cb, fast = shipped
    both, handed, diffs = differential(fast, generate(fast.data, fast.strings, 10_000, seed=7),
                                       cb._input_text, cb._eval_text)
    assert diffs == []
    assert both >= 9_000, (both, handed)  # the compiled path decides the bulk of them


def test_shipped_bundle_sample_vs_real_opa(shipped):
    bundle, cb, fast = shipped
    docs = [orjson.loads(cb._input_text(d)) for d in generate(fast.data, fast.strings, 3000, seed=12)]
    data = orjson.loads(bundle.data_json)
    data["regate_samples"] = docs
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data.json").write_text(json.dumps(data))
        rego = Path(tmp) / "rego"
        rego.mkdir()
        for i, m in enumerate(mm for mm in bundle.modules if not mm.is_test):
            (rego / f"m{i}.rego").write_text(m.source)
        query = "x = {i: d | some i; s := data.regate_samples[i]; d := data.regate.decision with input as s}"
        proc = subprocess.run([opa_binary(), "eval", "-f", "json", "-d", str(rego), "-d",
                               str(Path(tmp) / "data.json"), query], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    opa = json.loads(proc.stdout)["result"][0]["bindings"]["x"]
    compared = 0
    for i, doc in enumerate(docs):
        try:
            value = fast.eval_value(doc)
        except Exception:  # noqa: BLE001 - handed to regorus: not the compiled path's answer
            continue
        compared += 1
        want = opa.get(str(i), rt.U)
        if value is rt.U or want is rt.U:
            assert value is want, (doc, value, want)
            continue
        got = orjson.loads(orjson.dumps(value, default=rt.set_default))
        assert rt.eq(got, want), (doc, got, want)
    assert compared >= 2500


def test_embedded_engine_uses_it_when_auto(caplog):
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    with caplog.at_level(logging.INFO, logger="regate.engine.plan"):
        cb = CompiledBundle(bundle, "regate/decision", compiled="auto", memo_size=0)
    assert cb.fast is not None, caplog.text
    inp = {"agent": {"id": "coder-7"}, "tool": {"name": "shell", "route": "/tools/shell"},
           "request": {"method": "POST", "arguments": {"command": "ls -la"}}, "mcp": None}
    d = cb.decide(inp)
    assert d.allow is True and cb.fast.fallbacks == 0
    assert CompiledBundle(bundle, "regate/decision").fast is None  # off unless asked for


async def test_embedded_engine_switch():
    from proxy.config import Policy
    from proxy.engines.embedded import EmbeddedEngine
    assert Policy().compiled == "auto" and Policy(compiled="off").compiled == "off"
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    engine = EmbeddedEngine.from_bundle(bundle, compiled="auto")
    assert engine.compiled.fast is not None
    inp = {"agent": {"id": "analyst-2"}, "tool": {"name": "payments", "route": "/tools/payments"},
           "request": {"method": "POST", "arguments": {"amount": 150, "currency": "USD"}}, "mcp": None}
    d = await engine.evaluate(inp)
    assert d.allow is True and d.approval_required is True
    assert engine.compiled.fast.fallbacks == 0
    assert EmbeddedEngine.from_bundle(bundle).compiled.fast is None


def test_a_difference_refuses_the_fast_path(monkeypatch, caplog):
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    monkeypatch.setattr(rt, "BUILTINS", {**rt.BUILTINS, "startswith": lambda s, p: True})
    with caplog.at_level(logging.WARNING, logger="regate.engine.plan"):
        cb = CompiledBundle(bundle, "regate/decision", compiled="auto", memo_size=0)
    assert cb.fast is None
    assert "differently from regorus" in caplog.text
