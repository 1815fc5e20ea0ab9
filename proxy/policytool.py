"""`regate policy test` and `regate policy eval`: iterate on a bundle without a proxy.

``run_policy_tests`` runs every ``test_*`` rule of the bundle (``*_test.rego``
included) with the embedded engine and reports like ``opa test -v``: one line
per test, PASS, FAIL or ERROR, then a summary. ``eval_policy`` prints the
normalised decision for one input document, exactly as the proxy would apply
it. Both return the process exit code: 0 when all is well, 1 when a test
fails or the policy cannot decide, 2 when the bundle does not load.

The bundle is what the proxy would load: the rego and data directories, or an
``opa build`` tarball given in place of the rego directory. ``opa test`` on the
same paths gives the same pass/fail (tests/test_parity.py checks it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson
import regorus

from .engines.bundle import BundleError, load_bundle
from .engines.decision import DecisionError, EngineError
from .engines.embedded import (UNDEFINED, EmbeddedEngine, add_modules, format_regorus_error, missing_builtins,
                               scan_modules)


def _print_problems(problems: list[str], out: TextIO) -> None:
    for line in problems:
        print(f"error: {line}", file=out)


def _test_rules(ast_json: str) -> list[tuple[str, str, int]]:
    """(file, rule path, line) for every test_* rule, in file and line order."""
    seen: set[str] = set()
    found: list[tuple[str, str, int]] = []
    for mod in orjson.loads(ast_json):
        file = mod["source"]["file"]
        pkg = _dotted(mod["ast"]["package"]["refr"])
        for rule in mod["ast"]["rules"]:
            spec = rule.get("Spec")
            if not spec:
                continue
            head = next(iter(spec["head"].values()))
            ref = head.get("refr", {})
            name = ref.get("Var", {}).get("value") if isinstance(ref.get("Var"), dict) else None
            if not name or not name.startswith("test_"):
                continue
            path = f"data.{pkg}.{name}"
            if path not in seen:  # a test written as several bodies is one test, as in OPA
                seen.add(path)
                found.append((file, path, head.get("span", {}).get("line", 0)))
    return found


def _dotted(ref: dict) -> str:
    parts: list[str] = []
    cur = ref
    while "RefDot" in cur:
        parts.append(cur["RefDot"]["field"][-1])
        cur = cur["RefDot"]["refr"]
    parts.append(cur.get("Var", {}).get("value", "?"))
    return ".".join(reversed(parts))


def _engine_with_modules(rego_dir: str | Path, data_dir: str | Path | None, err: TextIO, *,
                         include_tests: bool = False) -> "tuple[regorus.Engine, Any] | None":
    """A regorus engine holding the bundle's modules (no data yet) and the bundle; None
    once the problems that stop it are printed to `err`."""
    try:
        bundle = load_bundle(rego_dir, data_dir, include_tests=include_tests)
    except BundleError as exc:
        _print_problems(exc.problems, err)
        return None
    engine = regorus.Engine()
    problems = add_modules(engine, bundle.modules)
    if problems:
        _print_problems(problems, err)
        return None
    return engine, bundle


def run_policy_tests(rego_dir: str | Path, data_dir: str | Path | None, *,
                     out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    loaded = _engine_with_modules(rego_dir, data_dir, err, include_tests=True)
    if loaded is None:
        return 2
    engine, bundle = loaded
    ast_json = engine.get_ast_as_json()
    problems = missing_builtins(scan_modules(ast_json, skip_tests=False))
    if problems:
        _print_problems(problems, err)
        return 2
    engine.add_data_json(bundle.data_json)
    engine.set_gather_prints(True)
    try:
        engine.eval_query("true")  # regorus's static checks, over every module
    except RuntimeError as exc:
        _print_problems([format_regorus_error(exc)], err)
        return 2

    tests = _test_rules(ast_json)
    if not tests:
        print(f"no test_* rules found under {rego_dir}", file=err)
        return 1
    counts = {"PASS": 0, "FAIL": 0, "ERROR": 0}
    current_file = None
    for file, path, _line in tests:
        if file != current_file:
            if current_file is not None:
                print(file=out)
            print(f"{file}:", file=out)
            current_file = file
        start = time.perf_counter()
        detail = ""
        try:
            value = engine.eval_rule_as_json(path)
            outcome = "PASS" if value.strip() == "true" else "FAIL"
        except RuntimeError as exc:
            outcome = "ERROR"
            detail = format_regorus_error(exc)
        took = (time.perf_counter() - start) * 1000
        counts[outcome] += 1
        print(f"{path}: {outcome} ({took:.1f}ms)", file=out)
        if detail:
            print(f"  {detail}", file=out)
        prints = engine.take_prints()
        if outcome != "PASS":
            for line in prints:
                print(f"  {line}", file=out)
    total = len(tests)
    print("-" * 80, file=out)
    for outcome in ("PASS", "FAIL", "ERROR"):
        if counts[outcome]:
            print(f"{outcome}: {counts[outcome]}/{total}", file=out)
    return 0 if counts["PASS"] == total else 1


def _read_input(input_path: str | Path) -> Any:
    if str(input_path) == "-":
        raw = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        raw = Path(input_path).read_bytes()
        name = str(input_path)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def eval_policy(rego_dir: str | Path, data_dir: str | Path | None, decision_path: str | None,
                input_path: str | Path, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    decision = (decision_path or "regate/decision").strip("/").replace(".", "/")
    if decision.startswith("data/"):
        decision = decision[5:]
    try:
        input_doc = _read_input(input_path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    if not isinstance(input_doc, dict):
        print(f"error: {input_path}: the input document must be a JSON object", file=err)
        return 2
    try:
        engine = EmbeddedEngine.from_bundle(load_bundle(rego_dir, data_dir), decision, memo_size=0)
    except BundleError as exc:
        _print_problems(exc.problems, err)
        return 2
    try:
        result = engine.compiled.decide(input_doc)
    except EngineError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except DecisionError as exc:
        # The policy stage would deny with policy_error; say why, and what the rule gave.
        print(f"error: {exc}", file=err)
        raw = engine.evaluate_raw(input_doc)
        if raw is not UNDEFINED:
            print(f"the rule gave: {orjson.dumps(raw).decode()}", file=err)
        return 1
    out.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"revision: {engine.revision}", file=err)
    return 0


def _plain(value: Any) -> Any:
    """regorus's answer as JSON can carry it: a set becomes a sorted array, as `opa eval` prints it."""
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=lambda v: orjson.dumps(v, option=orjson.OPT_SORT_KEYS))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def query_policy(rego_dir: str | Path, data_dir: str | Path | None, query: str, input_path: str | Path | None,
                 *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`regate policy eval --query Q`: the value of any rule or Rego query (`data.regate.x`,
    `data.tools.shell.deny`), with or without an input document, as `opa eval` would give it.
    Exit 1 when the query is undefined, 2 when the bundle or input cannot be read."""
    out = out or sys.stdout
    err = err or sys.stderr
    input_doc = None
    if input_path is not None:
        try:
            input_doc = _read_input(input_path)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=err)
            return 2
    loaded = _engine_with_modules(rego_dir, data_dir, err)
    if loaded is None:
        return 2
    engine, bundle = loaded
    engine.add_data_json(bundle.data_json)
    if input_doc is not None:
        engine.set_input_json(orjson.dumps(input_doc).decode())
    try:
        answer = engine.eval_query(query)
    except RuntimeError as exc:
        print(f"error: {format_regorus_error(exc)}", file=err)
        return 2
    results = answer.get("result") or []
    if not results:
        print(f"{query}: undefined", file=err)
        return 1
    for result in results:
        values = [_plain(e["value"]) for e in result.get("expressions", [])]
        doc = values[0] if len(values) == 1 else values
        if result.get("bindings"):
            doc = {"value": doc, "bindings": _plain(result["bindings"])}
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
