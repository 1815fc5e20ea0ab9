"""Policy-engine micro-benchmark: decisions/s and p50/p99 µs per decision on the
shipped policy, with the shipped data and with 100,000 agents.

Engines measured, each on the same four kinds of call (a public-tool GET, a
shell POST whose command runs the destructive-command regexes, a files GET
under a grant's root, and a denied call whose reason is formatted). Every
input is distinct (a counter in the path, the command, the amount), cycling
through more inputs than any memo holds, so each figure is the cost of a real
evaluation:

- `embedded`  Regate's embedded engine (proxy/engines, regorus), through its
              `evaluate(input) -> Decision`, as the policy stage calls it;
- `embedded-memo`  the same engine on the four inputs repeated: what a call
              costs when its decision is memoised (an agent repeating a call);
- `regorus`   the regorus library alone (JSON input in, value out): the floor
              under `embedded`, so the difference is Regate's own cost;
- `opa-inprocess`  real OPA (opa-golib-python-bindings, in this process);
- `opa-http`  Regate's `opa` engine over HTTP against the real OPA server
              (`opa run --server`, built by `make opa`), one long-lived session.

Each decision is checked against the expected allow/deny before timing starts:
a benchmark of a policy that does not decide is worthless.

Run: python -m benchmarks.engine_bench [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import servers  # noqa: E402
from benchmarks.policy_data import load_data, make_bundle, rego_modules, shipped_agents  # noqa: E402

DECISION = "regate/decision"


def _input(agent: str, tool: str, method: str, path: str, body: Any = None) -> dict:
    raw = orjson.dumps(body) if body is not None else b""
    return {
        "version": 1,
        "agent": {"id": agent, "claims": {}},
        "tool": {"name": tool, "route": f"/tools/{tool}", "gpu": None},
        "request": {
            "method": method, "path": path, "query": {},
            "headers": {"host": "127.0.0.1:8080", "user-agent": "agent/1.0", "accept": "*/*",
                        **({"content-type": "application/json"} if body is not None else {})},
            "body": body, "body_sha256": None, "size": len(raw),
        },
        "mcp": None,
        "state": {"breaker": "closed", "recent_failures": 0, "budget_left": 40.0},
        "time_ns": 1767225600000000000,
    }


def case_inputs(i: int) -> list[tuple[str, dict, bool]]:
    """The four kinds of call, made distinct by `i`: (case, input, expected allow)."""
    return [
        ("public-get", _input("coder-7", "echo", "GET", f"/tools/echo/ping/{i}"), True),
        ("shell-post", _input("coder-7", "shell", "POST", "/tools/shell/run",
                              {"command": f"ls -la /workspace/src/{i}"}), True),
        ("files-get", _input("analyst-2", "files", "GET", f"/tools/files/workspace/reports/q{i}.csv"), True),
        ("denied", _input("coder-7", "payments", "POST", "/tools/payments/pay", {"amount": 10 + i}), False),
    ]


CASES = [case for case, _doc, _want in case_inputs(0)]
# More distinct inputs than the embedded engine's memo holds (4096), cycled.
DISTINCT = 3000


def _allow_of(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("allow")
    return getattr(value, "allow", None)


def _summary(name: str, agents: int, samples: dict[str, list[int]], wall_s: float) -> dict:
    every = sorted(ns for s in samples.values() for ns in s)
    n = len(every)
    return {
        "engine": name, "agents": agents, "available": True, "decisions": n,
        "decisions_per_s": round(n / wall_s, 1) if wall_s > 0 else 0.0,
        "p50_us": round(every[n // 2] / 1000, 2), "p99_us": round(every[min(n - 1, int(n * 0.99))] / 1000, 2),
        "mean_us": round(statistics.fmean(every) / 1000, 2),
        "per_case_p50_us": {c: round(sorted(s)[len(s) // 2] / 1000, 2) for c, s in samples.items()},
    }


def _inputs(repeat: bool) -> list[tuple[str, dict, bool]]:
    if repeat:
        return case_inputs(0)
    return [item for i in range(DISTINCT) for item in case_inputs(i)]


def _check(name: str, case: str, got: Any, want: bool) -> None:
    if _allow_of(got) is not want:
        raise AssertionError(f"{name}: case {case} decided {got!r}, expected allow={want}")


def measure_sync(name: str, agents: int, fn: Callable[[dict], Any], seconds: float, repeat: bool = False) -> dict:
    inputs = _inputs(repeat)
    for case, doc, want in inputs[:8]:
        _check(name, case, fn(doc), want)
    samples: dict[str, list[int]] = {c: [] for c in CASES}
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    while clock() < deadline:
        for case, doc, _want in inputs:
            t0 = clock()
            fn(doc)
            samples[case].append(clock() - t0)
            if t0 > deadline:
                break
    return _summary(name, agents, samples, (clock() - start) / 1e9)


async def measure_async(name: str, agents: int, fn: Callable[[dict], Awaitable[Any]], seconds: float,
                        repeat: bool = False) -> dict:
    inputs = _inputs(repeat)
    for case, doc, want in inputs[:8]:
        _check(name, case, await fn(doc), want)
    samples: dict[str, list[int]] = {c: [] for c in CASES}
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    while clock() < deadline:
        for case, doc, _want in inputs:
            t0 = clock()
            await fn(doc)
            samples[case].append(clock() - t0)
            if t0 > deadline:
                break
    return _summary(name, agents, samples, (clock() - start) / 1e9)


# -- engines --------------------------------------------------------------------

def bench_regorus(rego: Path, data_doc: dict, agents: int, seconds: float) -> dict:
    import regorus

    engine = regorus.Engine()
    for name, src in rego_modules(rego).items():
        engine.add_policy(name, src)
    engine.add_data_json(orjson.dumps(data_doc).decode())
    rule = "data." + DECISION.replace("/", ".")

    def decide(doc: dict) -> Any:
        engine.set_input_json(orjson.dumps(doc).decode())
        return engine.eval_rule(rule)

    return measure_sync("regorus", agents, decide, seconds)


def bench_opa_inprocess(rego: Path, data_doc: dict, agents: int, seconds: float) -> dict:
    from opa_bindings import OpaEngine

    engine = OpaEngine()
    try:
        for name, src in rego_modules(rego).items():
            engine.add_policy(name, src)
        engine.add_data(data_doc)

        def decide(doc: dict) -> Any:
            return engine.eval_document(DECISION.replace("/", "."), input=doc)

        return measure_sync("opa-inprocess", agents, decide, seconds)
    finally:
        engine.close()


def _regate_config(rego: Path, data: Path, engine: str, opa_url: str | None = None):
    from proxy import config

    # A generous deadline: this measures the engine's speed, not Regate's timeout.
    policy: dict = {"engine": engine, "rego": str(rego), "data": str(data), "timeout_ms": 10_000}
    if opa_url:
        policy["opa"] = {"url": opa_url}
    return config.validate({"tools": [{"name": "echo", "upstream": "http://127.0.0.1:9/"}], "policy": policy},
                           base_dir=str(ROOT))


async def bench_regate_engine(label: str, engine_kind: str, rego: Path, data: Path, agents: int, seconds: float,
                              opa_url: str | None = None, repeat: bool = False) -> dict:
    from proxy.engines import build_engine

    engine = build_engine(_regate_config(rego, data, engine_kind, opa_url))
    if getattr(engine, "name", None) != engine_kind:
        raise RuntimeError(f"proxy.engines.build_engine gave engine {getattr(engine, 'name', None)!r} "
                           f"for `policy.engine: {engine_kind}` (not implemented yet?)")
    await engine.start()
    try:
        return await measure_async(label, agents, engine.evaluate, seconds, repeat)
    finally:
        await engine.close()


def run(seconds: float, sizes: list[int], server_cpus: str | None) -> dict:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="regate-engine-bench-"))

    def attempt(engine: str, agents: int, thunk: Callable[[], dict]) -> None:
        t0 = time.monotonic()
        try:
            row = thunk()
        except Exception as exc:
            row = {"engine": engine, "agents": agents, "available": False,
                   "reason": f"{exc.__class__.__name__}: {exc}"}
        row["setup_and_run_s"] = round(time.monotonic() - t0, 2)
        results.append(row)
        if row["available"]:
            print(f"[engine] {engine:>14} {agents:>7,} agents: {row['decisions_per_s']:>9,.0f}/s "
                  f"p50 {row['p50_us']:.1f}us p99 {row['p99_us']:.1f}us", file=sys.stderr, flush=True)
        else:
            print(f"[engine] {engine:>14} {agents:>7,} agents: unavailable: {row['reason'][:200]}",
                  file=sys.stderr, flush=True)

    try:
        for agents in sizes:
            rego, data = make_bundle(tmp / f"bundle-{agents}", agents)
            data_doc = load_data(data)
            attempt("embedded", agents,
                    lambda: asyncio.run(bench_regate_engine("embedded", "embedded", rego, data, agents, seconds)))
            attempt("embedded-memo", agents,
                    lambda: asyncio.run(bench_regate_engine("embedded-memo", "embedded", rego, data, agents, seconds,
                                                            repeat=True)))
            attempt("regorus", agents, lambda: bench_regorus(rego, data_doc, agents, seconds))
            attempt("opa-inprocess", agents, lambda: bench_opa_inprocess(rego, data_doc, agents, seconds))

            def over_http() -> dict:
                proc, url = servers.start_opa(f"opa-{agents}", tmp, server_cpus, rego, data)
                try:
                    return asyncio.run(bench_regate_engine("opa-http", "opa", rego, data, agents, seconds, url))
                finally:
                    proc.stop()

            attempt("opa-http", agents, over_http)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds_per_engine": seconds, "cases": CASES, "distinct_inputs": DISTINCT * len(CASES),
            "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Policy-engine micro-benchmark (shipped policy).")
    ap.add_argument("--quick", action="store_true", help="0.5 s per engine and size instead of 2 s")
    ap.add_argument("--seconds", type=float, help="timed seconds per engine and data size")
    ap.add_argument("--agents", default=None, help="comma-separated data sizes (default: shipped,100000)")
    ap.add_argument("--server-cpus", help="taskset CPU list for the OPA server")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    seconds = args.seconds or (0.5 if args.quick else 2.0)
    sizes = [int(s) for s in args.agents.split(",")] if args.agents else [len(shipped_agents()), 100_000]
    out = run(seconds, sizes, args.server_cpus)
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
