"""What enforcing ``policy.timeout_ms`` costs the embedded engine, and what it buys.

1. The hot path, on the shipped bundle with distinct inputs (fresh decisions)
   and repeated ones (memo hits): ``EmbeddedEngine.evaluate`` (the input size
   check, the CPU-time deadline check) against ``CompiledBundle.decide`` (the
   bare evaluation, what ``evaluate`` did before), with ``evaluate`` run twice
   as an A/A control. Rounds interleave the three, each first in turn, so drift
   hits all alike; the figures are medians over rounds of the mean per decision.
2. Inputs just past ``policy.inline_input_bytes``: on the loop, and in the
   worker process (the hop: a pipe each way and a second engine).
3. The event loop while a ~2 s evaluation is judged (a policy quadratic in the
   body's keys, ``policy.timeout_ms: 500``): the longest gap a 2 ms heartbeat
   sees, evaluating on the loop against in a worker process.

Run: python -m benchmarks.policy_timeout [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import measure_async  # noqa: E402
from proxy.engines import EngineTimeout  # noqa: E402
from proxy.engines.embedded import EmbeddedEngine  # noqa: E402

QUADRATIC = """package regate
import rego.v1
pairs := count([1 | some a, _ in input.request.body; some b, _ in input.request.body; a < b]) if {
	is_object(input.request.body)
} else := 0
decision := {"allow": true, "reasons": [sprintf("%d pairs", [pairs])]}
"""


async def hot_path(seconds: float, rounds: int) -> dict:
    engine = EmbeddedEngine(ROOT / "rego", ROOT / "policies", eval_processes=1)
    await engine.start()
    compiled = engine.compiled

    async def bare(doc: dict):
        return compiled.decide(doc)

    runs = {"decide": bare, "evaluate": engine.evaluate, "evaluate-again": engine.evaluate}
    out: dict[str, dict[str, list[float]]] = {name: {"fresh": [], "memo": []} for name in runs}
    try:
        names = list(runs)
        for r in range(rounds):
            for name in names[r % 3:] + names[:r % 3]:  # each goes first in turn
                fn = runs[name]
                for kind, repeat in (("fresh", False), ("memo", True)):
                    compiled.memo.clear()
                    r = await measure_async(name, 0, fn, seconds, repeat=repeat)
                    out[name][kind].append(r["mean_us"])
    finally:
        await engine.close()
    table = {name: {kind: round(statistics.median(v), 2) for kind, v in kinds.items()} for name, kinds in out.items()}
    for kind in ("fresh", "memo"):
        base = table["decide"][kind]
        table[f"ratio_evaluate/decide_{kind}"] = round(table["evaluate"][kind] / base, 3)
        table[f"ratio_aa_{kind}"] = round(table["evaluate-again"][kind] / table["evaluate"][kind], 3)
    return table


def _bundle(tmp: Path, rego: str) -> tuple[Path, Path]:
    (tmp / "rego").mkdir(exist_ok=True)
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "rego" / "p.rego").write_text(rego)
    return tmp / "rego", tmp / "data"


async def _ready(engine: EmbeddedEngine) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await engine.evaluate({"request": {"body": {"pad": "x" * 40_000}}})
            return
        except EngineTimeout:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def hop(tmp: Path, n: int) -> dict:
    rego, data = _bundle(tmp, QUADRATIC)
    docs = [{"request": {"body": {"pad": f"{i:08d}" + "x" * 20_000, "a": i}}} for i in range(n)]
    result = {}
    for name, procs in (("inline", 0), ("worker", 1)):
        engine = EmbeddedEngine(rego, data, eval_processes=procs, timeout_ms=5000)
        await engine.start()
        try:
            await _ready(engine)
            t0 = time.perf_counter()
            for d in docs:
                await engine.evaluate(d)
            result[f"{name}_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
        finally:
            await engine.close()
    result["input_bytes"] = len(docs[0]["request"]["body"]["pad"]) + 20
    return result


async def stall(tmp: Path) -> dict:
    rego, data = _bundle(tmp, QUADRATIC)
    huge = {"request": {"body": {f"key{i:05d}": i for i in range(2000)}}}
    result = {}
    for name, procs in (("inline", 0), ("worker", 1)):
        engine = EmbeddedEngine(rego, data, eval_processes=procs, timeout_ms=500)
        await engine.start()
        gaps: list[float] = []
        done = asyncio.Event()

        async def heartbeat():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        try:
            await _ready(engine)
            beat = asyncio.create_task(heartbeat())
            await asyncio.sleep(0.02)
            t0 = time.perf_counter()
            try:
                await engine.evaluate(huge)
                outcome = "decided"
            except EngineTimeout:
                outcome = "timeout"
            answered = time.perf_counter() - t0
            done.set()
            await beat
        finally:
            await engine.close()
        result[name] = {"answered_ms": round(answered * 1e3, 1), "outcome": outcome,
                        "longest_loop_gap_ms": round(max(gaps) * 1e3, 1)}
    return result


async def run(quick: bool) -> dict:
    seconds, rounds, n = (0.5, 3, 200) if quick else (2.0, 6, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("hop", "stall"):
            (Path(tmp) / sub).mkdir()
        return {
            "hot_path_mean_us": await hot_path(seconds, rounds),
            "past_inline_threshold": await hop(Path(tmp) / "hop", n),
            "loop_while_judging_2s_input": await stall(Path(tmp) / "stall"),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args.quick))
    except ImportError:
        result = asyncio.run(run(args.quick))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
