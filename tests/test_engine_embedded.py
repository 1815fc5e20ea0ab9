"""The embedded engine (regorus): loading, errors users read, reload, revision."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from proxy.config import validate
from proxy.engines import BundleError, Engine, OffEngine, build_engine
from proxy.engines.bundle import Bundle, load_bundle
from proxy.engines.decision import DecisionError, EngineError
from proxy.engines.embedded import EmbeddedEngine
from proxy.engines.opa import OpaEngine

ROOT = Path(__file__).resolve().parents[1]

ALLOW_ALL = """package regate

decision := {"allow": true, "reasons": reasons}

reasons contains r if some r in input.notes
"""


def bundle_dir(tmp_path: Path, rego: dict[str, str], data: dict[str, str] | None = None) -> tuple[Path, Path]:
    rdir, ddir = tmp_path / "rego", tmp_path / "policies"
    for name, text in rego.items():
        (rdir / name).parent.mkdir(parents=True, exist_ok=True)
        (rdir / name).write_text(text)
    ddir.mkdir(parents=True, exist_ok=True)
    for name, text in (data or {}).items():
        (ddir / name).parent.mkdir(parents=True, exist_ok=True)
        (ddir / name).write_text(text)
    return rdir, ddir


def load(tmp_path, rego, data=None, decision="regate/decision") -> EmbeddedEngine:
    rdir, ddir = bundle_dir(tmp_path, rego, data)
    engine = EmbeddedEngine(rdir, ddir, decision)
    engine.load()
    return engine


def decide(engine: EmbeddedEngine, input_doc: dict):
    # evaluate() must answer without yielding to the event loop.
    coro = engine.evaluate(input_doc)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("evaluate() yielded to the event loop")


def test_compile_error_names_file_and_line(tmp_path):
    with pytest.raises(BundleError) as err:
        load(tmp_path, {"ok.rego": ALLOW_ALL, "sub/bad.rego": "package regate.x\n\nallow if {\n  input.a ==\n}\n"})
    (problem,) = err.value.problems
    assert f"{tmp_path / 'rego' / 'sub' / 'bad.rego'}:5:1: expecting expression" == problem


def test_every_broken_module_is_reported(tmp_path):
    with pytest.raises(BundleError) as err:
        load(tmp_path, {"a.rego": "package a\nr if {", "b.rego": "package b\nr := "})
    assert len(err.value.problems) == 2
    assert "a.rego:" in err.value.problems[0] and "b.rego:" in err.value.problems[1]


def test_unsafe_variable_is_found_at_load_not_on_a_call(tmp_path):
    rego = {"p.rego": ALLOW_ALL + "\nbad if { x == 1 }\n"}
    with pytest.raises(BundleError, match=r"p\.rego:7:10: use of undefined variable `x` is unsafe"):
        load(tmp_path, rego)


def test_missing_builtin_names_it_and_points_at_opa(tmp_path):
    rego = {"p.rego": ALLOW_ALL + "\nclaims := io.jwt.decode(input.token)\nmac := crypto.hmac.sha256(\"m\", \"k\")\n"}
    with pytest.raises(BundleError) as err:
        load(tmp_path, rego)
    text = str(err.value)
    assert "p.rego:7:" in text and "io.jwt.decode is not available in the embedded engine" in text
    assert "crypto.hmac.sha256" in text
    assert "engine: opa" in text


def test_user_functions_are_not_mistaken_for_missing_builtins(tmp_path):
    rego = {
        "p.rego": "package regate\nimport data.lib\nimport data.lib as L\n"
                  "decision := {\"allow\": lib.ok(1), \"reasons\": [L.twice(\"x\"), helper.name(2)]}\n"
                  "helper.name(x) := sprintf(\"%d\", [x])\n",
        "lib.rego": "package lib\nok(x) := x == 1\ntwice(s) := concat(\"\", [s, s])\n",
    }
    engine = load(tmp_path, rego)
    assert decide(engine, {}).reasons == ["xx", "2"]


def test_decision_rule_must_exist(tmp_path):
    with pytest.raises(BundleError, match=r"data\.regate\.verdict is not defined by any module"):
        load(tmp_path, {"p.rego": ALLOW_ALL}, decision="regate/verdict")


def test_data_files_mount_by_path_and_name_the_file_on_error(tmp_path):
    rego = {"p.rego": "package regate\ndecision := {\"allow\": true, \"reasons\": [data.agents.a.name, data.x.y.z]}\n"}
    engine = load(tmp_path, rego, {"agents/data.yaml": "a: {name: alpha}\n", "x/y/data.json": '{"z": "deep"}'})
    assert decide(engine, {}).reasons == ["alpha", "deep"]

    with pytest.raises(BundleError, match=r"agents/data\.yaml:2:\d+: not valid YAML"):
        load(tmp_path, rego, {"agents/data.yaml": "a: [1\nb: 2\n"})
    shutil.rmtree(tmp_path / "policies")
    with pytest.raises(BundleError, match=r"y/data\.json:1:7: not valid JSON"):
        load(tmp_path, rego, {"x/y/data.json": '{"z": }'})
    shutil.rmtree(tmp_path / "policies")
    with pytest.raises(BundleError, match=r"data\.agents\.a is already set by .*agents/data\.json"):
        load(tmp_path, rego, {"agents/data.json": '{"a": 1}', "agents/data.yaml": "a: 2\n"})


def test_sets_come_back_as_sorted_lists(tmp_path):
    engine = load(tmp_path, {"p.rego": ALLOW_ALL})
    d = decide(engine, {"notes": ["zeta", "alpha", "mid", "alpha"]})
    assert d.reasons == ["alpha", "mid", "zeta"]
    assert engine.evaluate_raw({"notes": ["b", "a"]})["reasons"] == ["a", "b"]


def test_undefined_or_malformed_decision_is_a_decision_error(tmp_path):
    engine = load(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": "yes"} if input.x\n'})
    with pytest.raises(DecisionError, match="undefined"):
        decide(engine, {})
    with pytest.raises(DecisionError, match="allow must be a boolean"):
        decide(engine, {"x": True})
    # Memoised answers fail the same way the second time.
    with pytest.raises(DecisionError, match="allow must be a boolean"):
        decide(engine, {"x": True})


def test_evaluation_error_is_an_engine_error(tmp_path):
    engine = load(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": input.n + 1 > 0}\n'})
    with pytest.raises(EngineError, match=r"p\.rego:2:\d+: .*expects numeric argument"):
        decide(engine, {"n": "one"})


def test_memoised_decisions_are_handed_out_fresh(tmp_path):
    engine = load(tmp_path, {"p.rego": ALLOW_ALL})
    first = decide(engine, {"notes": ["a"]})
    first.reasons.append("tampered")
    assert decide(engine, {"notes": ["a"]}).reasons == ["a"]


def test_policies_that_read_the_clock_are_not_memoised(tmp_path):
    engine = load(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": true, "reasons": [sprintf("%d", [time.now_ns()])]}\n'})
    assert engine.compiled.memo is None
    assert decide(engine, {}).reasons != decide(engine, {}).reasons


def test_input_is_cut_to_what_the_policy_reads(tmp_path):
    engine = load(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": true, "reasons": [input.request.headers["x-a"], input.agent.id]}\n'})
    assert engine.compiled.projection == {"request": {"headers": {"x-a": True}}, "agent": {"id": True}}
    doc = {"agent": {"id": "a1", "claims": {"big": "x" * 1000}}, "request": {"headers": {"x-a": "1", "x-b": "2"}}}
    assert decide(engine, doc).reasons == ["1", "a1"]
    # A policy that reads the whole input gets the whole input.
    engine = load(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": true, "reasons": [sprintf("%d", [count(input)])]}\n'})
    assert engine.compiled.projection is None
    assert decide(engine, {"a": 1, "b": 2, "c": 3}).reasons == ["3"]


async def test_reload_with_a_broken_policy_keeps_the_old_one_serving(tmp_path):
    rdir, ddir = bundle_dir(tmp_path, {"p.rego": ALLOW_ALL})
    engine = EmbeddedEngine(rdir, ddir)
    await engine.start()
    old = engine.revision
    (rdir / "p.rego").write_text('package regate\ndecision := {"allow": false')
    with pytest.raises(BundleError, match=r"p\.rego:2:"):
        await engine.reload()
    assert engine.revision == old
    assert (await engine.evaluate({"notes": []})).allow is True

    (rdir / "p.rego").write_text('package regate\ndecision := {"allow": false, "reasons": ["closed"]}\n')
    new = await engine.reload()
    assert new != old and engine.revision == new
    assert (await engine.evaluate({"notes": []})).reasons == ["closed"]


async def test_concurrent_reloads_and_calls_see_one_bundle_or_the_other(tmp_path):
    rdir, ddir = bundle_dir(tmp_path, {"p.rego": 'package regate\ndecision := {"allow": true, "reasons": [data.v.n]}\n'},
                            {"v/data.yaml": "n: one\n"})
    engine = EmbeddedEngine(rdir, ddir)
    await engine.start()
    seen = []
    done = asyncio.Event()

    async def caller():
        i = 0
        while not done.is_set():
            i += 1
            seen.append((await engine.evaluate({"i": i})).reasons[0])
            await asyncio.sleep(0)

    async def reloader():
        for word in ("two", "three"):
            (ddir / "v" / "data.yaml").write_text(f"n: {word}\n")
            await engine.reload()
            await asyncio.sleep(0.01)
        done.set()

    await asyncio.gather(caller(), caller(), reloader())
    assert set(seen) <= {"one", "two", "three"}
    assert seen[0] == "one" and seen[-1] == "three"


async def test_revision_follows_data_but_not_tests(tmp_path):
    rdir, ddir = bundle_dir(tmp_path, {"p.rego": ALLOW_ALL}, {"agents/data.yaml": "a: 1\n"})
    engine = EmbeddedEngine(rdir, ddir)
    await engine.start()
    first = engine.revision
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 12
    (rdir / "p_test.rego").write_text("package regate_test\ntest_x if true\n")
    assert await engine.reload() == first
    (ddir / "agents" / "data.yaml").write_text("a: 2\n")
    assert await engine.reload() != first
    (ddir / "agents" / "data.yaml").write_text("a: 1\n")
    assert await engine.reload() == first


def test_same_content_same_revision_anywhere(tmp_path):
    a = load_bundle(ROOT / "rego", ROOT / "policies")
    shutil.copytree(ROOT / "rego", tmp_path / "r")
    shutil.copytree(ROOT / "policies", tmp_path / "p")
    assert load_bundle(tmp_path / "r", tmp_path / "p").revision == a.revision
    assert Bundle.from_sources({"x.rego": "package x"}).revision.startswith("sha256:")


def test_missing_directories_are_named(tmp_path):
    with pytest.raises(BundleError, match="rego directory does not exist"):
        load_bundle(tmp_path / "nope", tmp_path)
    (tmp_path / "r").mkdir()
    with pytest.raises(BundleError, match="no .rego files"):
        load_bundle(tmp_path / "r", tmp_path)
    (tmp_path / "r" / "p.rego").write_text("package p\n")
    with pytest.raises(BundleError, match="data directory does not exist"):
        load_bundle(tmp_path / "r", tmp_path / "nodata")


async def test_build_engine_follows_the_config(tmp_path):
    def cfg(policy):
        return validate({"tools": [{"name": "t", "upstream": "http://127.0.0.1:1"}], "policy": policy},
                        base_dir=str(ROOT))

    embedded = build_engine(cfg({}))
    assert isinstance(embedded, EmbeddedEngine) and isinstance(embedded, Engine)
    await embedded.start()
    assert embedded.name == "embedded" and embedded.revision.startswith("sha256:")
    opa = build_engine(cfg({"engine": "opa", "timeout_ms": 75, "opa": {"url": "http://127.0.0.1:9", "token": "t"}}))
    assert isinstance(opa, OpaEngine) and opa.timeout_ms == 75
    off = build_engine(cfg({"engine": "off"}))
    assert isinstance(off, OffEngine) and off.revision == "off"
    assert (await off.evaluate({})).allow is True
