"""Fresh decisions on the shipped bundle at N agents: the compiled path (policy.compiled:
auto) against regorus, interleaved in one run, with an A/A control (regorus twice).

    python -m benchmarks.engine_plan_bench [--agents 100000] [--inputs 20000] [--json out.json]

Each input is distinct (generated, agents drawn from the N), each decision is
``CompiledBundle.decide_text`` with the memo off: projection excluded, JSON
parse of the engine's answer and ``parse_decision`` included. Wall-clock
``perf_counter_ns`` per call on a shared machine: read p50 before p99.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.engines.bundle import load_bundle  # noqa: E402
from proxy.engines.embedded import CompiledBundle  # noqa: E402
from proxy.engines.plan.inputs import generate  # noqa: E402


def _bundle(agents: int):
    tmp = Path(tempfile.mkdtemp(prefix="regate-plan-bench-"))
    shutil.copytree(ROOT / "policies", tmp / "policies")
    base = load_bundle(ROOT / "rego", ROOT / "policies")
    data = orjson.loads(base.data_json)
    real = data.get("agents", {})
    grants = list(real.values())
    out = dict(real)
    for i in range(agents - len(real)):
        out[f"agent-{i}"] = grants[i % len(grants)]
    agents_dir = tmp / "policies" / "agents"
    for f in agents_dir.iterdir():
        f.unlink()
    (agents_dir / "data.json").write_bytes(orjson.dumps(out))
    return load_bundle(ROOT / "rego", tmp / "policies"), sorted(out), tmp


def _pct(xs: list[int], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))] / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--inputs", type=int, default=20_000)
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args()
    bundle, names, tmp = _bundle(a.agents)
    try:
        t = time.perf_counter()
        fast = CompiledBundle(bundle, "regate/decision", memo_size=0, compiled="auto")
        load_s = time.perf_counter() - t
        assert fast.fast is not None, "the compiled path was refused (see the log)"
        reg_a = CompiledBundle(bundle, "regate/decision", memo_size=0)
        reg_b = CompiledBundle(bundle, "regate/decision", memo_size=0)
        r = random.Random(5)
        texts = []
        for doc in generate(fast.fast.data, fast.fast.strings, a.inputs, seed=3):
            if isinstance(doc["agent"].get("id"), str) and r.random() < 0.7:
                doc["agent"]["id"] = r.choice(names)
            texts.append(fast._input_text(doc))
        arms = {"compiled": fast, "regorus": reg_a, "regorus_aa": reg_b}
        times: dict[str, list[int]] = {k: [] for k in arms}
        cpu: dict[str, list[int]] = {k: [] for k in arms}
        order = list(arms)
        clock = time.perf_counter_ns
        tclock = time.thread_time_ns
        for text in texts[:500]:  # warm up
            for cb in arms.values():
                try:
                    cb.decide_text(text)
                except Exception:  # noqa: BLE001 - a DecisionError is a decision too
                    pass
        fast.fast.fallbacks = 0
        for text in texts:
            r.shuffle(order)
            for k in order:
                cb = arms[k]
                c0 = tclock()
                t0 = clock()
                try:
                    cb.decide_text(text)
                except Exception:  # noqa: BLE001
                    pass
                t1 = clock()
                cpu[k].append(tclock() - c0)
                times[k].append(t1 - t0)
        result = {"agents": a.agents, "inputs": len(texts), "compiled_load_s": round(load_s, 3),
                  "handed_to_regorus": fast.fast.fallbacks,
                  "note": "wall: perf_counter; cpu: thread CPU time (not descheduled time); shared, noisy machine"}
        for k in arms:
            result[k] = {}
            for label, xs in (("wall", times[k]), ("cpu", cpu[k])):
                xs.sort()
                result[k][label] = {"p50_us": round(_pct(xs, 0.5), 1), "p99_us": round(_pct(xs, 0.99), 1),
                                    "p999_us": round(_pct(xs, 0.999), 1),
                                    "mean_us": round(sum(xs) / len(xs) / 1000, 1)}
        print(json.dumps(result, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
