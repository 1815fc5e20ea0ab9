"""Retry-storm simulation: how many calls reach a failing tool, with and without Regate's guards.

    python -m benchmarks.retry_storm [--seconds 60] [--agents 50] [--tries 20]
                                     [--agent stubborn|listening] [--breakers JSON] [--json] [--out FILE]

A benchmark, not a test. The tool (tests/support/flaky_upstream.py, mode ``hash``)
answers 400 ``validation failed: table '...' does not exist`` to 30% of distinct calls,
deterministically by argument: a call fails exactly when the SHA-256 of its ``table``
falls in the lowest 30% of hashes. So "a call that could succeed" is well defined: a
call whose table exists, whatever else it says.

Each simulated agent works through its own seeded stream of *intents* (a table and a
~200-character question, plus ``limit``, ``format``, ``request_id``). It sends the
intent; after a failure it "re-reasons" and re-sends the call with one more small random
edit (a changed character, a doubled space, a word's case, trailing punctuation, another
``limit`` or ``format``, reordered keys; a fresh ``request_id`` every time; never the
table, so a failing call stays failing) until it has tried ``--tries`` times, then moves
on to its next intent. It thinks ``--think-ms`` (+-50%) before every send. Facing Regate:
on ``agent_backoff`` / ``tool_unavailable`` it waits ``Retry-After`` and sends the same
call again (not a new try), as any HTTP client would; on ``retry_loop`` a *stubborn*
agent (default) counts one more failed try and keeps editing, a *listening* agent does
what the message says and stops retrying that call.

Run 1, direct: the agents call the tool for ``--seconds``; each finishes the intent it is
on. Run 2, through Regate (the shipped policy, ``breakers:`` defaults or ``--breakers``,
rate limits off, audit on): each agent works through the same intents, in the same
order, with the same edits, for at most ``--max-factor`` x ``--seconds``. Compared: each
agent's first N intents, N = how many it finished through Regate, so both columns are
the same work. Reported: calls the tool received (counted by the agents, checked against
the tool's own count), the ratio, and whether exactly the same intents succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.flaky_upstream import FlakyUpstream, _hash_fails
from tests.support.procs import ROOT, free_port

ADMIN_TOKEN = "retry-storm-admin"
ERROR_MESSAGE = "validation failed: table {value!r} does not exist"
WORDS = (
    "revenue orders customers region quarter average basket total report group sort by highest lowest "
    "first last month week year products returns carrier shipped late early count sum list top ten "
    "per each every with without where which who placed more than less between during since until "
    "and or the of in for to from on at show compute find select rank join filter distinct median "
    "growth churn margin cost price discount refund invoice supplier warehouse stock level daily "
    "weekly monthly trend compare against previous current target forecast segment channel online "
    "store mobile email campaign conversion rate visits sessions users accounts active new returning"
).split()
NOUNS = ("orders", "customers", "invoices", "returns", "shipments", "products", "sessions", "refunds",
         "suppliers", "accounts", "campaigns", "stock", "payments", "visits", "events", "reviews")
EDITS = ("char", "space", "case", "punct", "limit", "format", "reorder")


def make_intent(seed: int, agent: int, j: int) -> tuple[random.Random, dict]:
    rng = random.Random(f"{seed}/{agent}/{j}")
    body = {
        "request_id": f"a{agent}-i{j}-t0",
        "table": f"{rng.choice(NOUNS)}_{rng.choice(NOUNS)}_{rng.randrange(10_000)}",
        "query": " ".join(rng.choice(WORDS) for _ in range(rng.randint(26, 36))),
        "limit": rng.choice((10, 20, 50, 100)),
        "format": rng.choice(("json", "table", "csv")),
    }
    return rng, body


def edit(rng: random.Random, body: dict, attempt: int) -> dict:
    """One small random edit of a failed call: the same call, re-reasoned a little."""
    b = dict(body)
    b["request_id"] = b["request_id"].rsplit("-t", 1)[0] + f"-t{attempt}"
    kind = rng.choice(EDITS)
    q = b["query"]
    if kind == "char":
        pos = rng.randrange(len(q))
        b["query"] = q[:pos] + rng.choice("abcdefghijklmnopqrstuvwxyz") + q[pos + 1:]
    elif kind == "space":
        spaces = [i for i, c in enumerate(q) if c == " "]
        pos = rng.choice(spaces) if spaces else 0
        b["query"] = q[:pos] + " " + q[pos:]
    elif kind == "case":
        words = q.split(" ")
        i = rng.randrange(len(words))
        words[i] = words[i].capitalize() if words[i][:1].islower() else words[i].lower()
        b["query"] = " ".join(words)
    elif kind == "punct":
        b["query"] = q + rng.choice((".", "?", "!", " please", " thanks"))
    elif kind == "limit":
        b["limit"] = rng.choice([v for v in (10, 20, 25, 50, 100, 200) if v != b["limit"]])
    elif kind == "format":
        b["format"] = rng.choice([v for v in ("json", "table", "csv", "markdown") if v != b["format"]])
    else:
        items = list(b.items())
        rng.shuffle(items)
        b = dict(items)
    return b


@dataclass
class Intent:
    """One distinct call an agent finished: how it went, and what it cost the tool."""

    valid: bool                 # it could succeed (its table exists)
    succeeded: bool = False
    sends: int = 0              # requests the agent sent for it (re-sends after a wait included)
    tool_calls: int = 0         # of those, the ones the tool answered (not refused by Regate)
    tool_failures: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    refused_while_valid: int = 0  # Regate refusals of a call that could succeed (it waited, re-sent)
    waited_s: float = 0.0
    latency_s: float = 0.0      # first send -> success


@dataclass
class Run:
    name: str
    seconds: float = 0.0
    agents: list[list[Intent]] = field(default_factory=list)
    upstream: dict = field(default_factory=dict)
    complete: bool = True
    tool_calls_seen: list[int] = field(default_factory=lambda: [0])  # all runs' tool answers, finished or not


def summarise(run: Run, prefix: list[int]) -> dict:
    """The first ``prefix[a]`` intents of each agent: the work both runs did."""
    done = [i for a, log in enumerate(run.agents) for i in log[:prefix[a]]]
    refusals: dict[str, int] = {}
    for i in done:
        for k, v in i.refusals.items():
            refusals[k] = refusals.get(k, 0) + v
    lat = sorted(i.latency_s for i in done if i.succeeded)
    return {
        "intents": len(done),
        "could_succeed": sum(i.valid for i in done),
        "succeeded": sum(i.succeeded for i in done),
        "agent_sends": sum(i.sends for i in done),
        "tool_calls": sum(i.tool_calls for i in done),
        "tool_failures": sum(i.tool_failures for i in done),
        "refusals": refusals,
        "refusals_of_calls_that_could_succeed": sum(i.refused_while_valid for i in done),
        "agent_wait_s": round(sum(i.waited_s for i in done), 1),
        "success_latency_p50_s": _pct(lat, 0.5),
        "success_latency_p99_s": _pct(lat, 0.99),
        # The whole run, not only the compared work: how fast the agents got through intents.
        "intents_per_s": round(sum(len(log) for log in run.agents) / max(run.seconds, 1e-9), 1),
    }


def _pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else 0.0


async def agent_loop(agent: int, session: aiohttp.ClientSession, url: str, headers: dict, args: argparse.Namespace,
                     log: list[Intent], seen: list[int], *, deadline: float | None = None,
                     intents: int | None = None) -> None:
    think = random.Random(f"think/{args.seed}/{agent}")
    j = 0
    while (intents is None or j < intents) and (deadline is None or time.monotonic() < deadline):
        rng, body = make_intent(args.seed, agent, j)
        it = Intent(valid=not _hash_fails(body["table"], args.fail_ratio))
        tries = 0
        started = time.monotonic()
        while tries < args.tries:
            await asyncio.sleep(args.think_ms / 1000 * (0.5 + think.random()))
            it.sends += 1
            async with session.post(url, data=json.dumps(body), headers=headers) as r:
                status = r.status
                payload = await r.read()
                retry_after = r.headers.get("Retry-After")
            if status < 400:
                seen[0] += 1
                it.tool_calls += 1
                it.succeeded = True
                it.latency_s = time.monotonic() - started
                break
            code = None
            try:
                code = json.loads(payload)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
            if code == "tool_error":  # the tool's own 400
                seen[0] += 1
                it.tool_calls += 1
                it.tool_failures += 1
            else:
                key = code or str(status)
                it.refusals[key] = it.refusals.get(key, 0) + 1
                it.refused_while_valid += it.valid
            if code in ("agent_backoff", "tool_unavailable") and retry_after is not None:
                wait = float(retry_after)
                it.waited_s += wait
                await asyncio.sleep(wait)
                continue  # the same call again, after the wait: not a new try
            if code == "retry_loop" and args.agent == "listening":
                break  # "change the arguments or stop retrying": it stops
            tries += 1
            if tries < args.tries:
                body = edit(rng, body, tries)
        log.append(it)
        j += 1


async def run_agents(name: str, url: str, keys: list[str] | None, args: argparse.Namespace, *,
                     seconds: float | None = None, intents: list[int] | None = None) -> Run:
    run = Run(name, agents=[[] for _ in range(args.agents)])
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.monotonic()
        deadline = t0 + seconds if seconds is not None else None
        tasks = []
        for a in range(args.agents):
            headers = {"Content-Type": "application/json"}
            if keys is not None:
                headers["X-Api-Key"] = keys[a]
            tasks.append(asyncio.create_task(agent_loop(
                a, session, url, headers, args, run.agents[a], run.tool_calls_seen, deadline=deadline,
                intents=intents[a] if intents is not None else None)))
        cap = None if seconds is not None else args.seconds * args.max_factor
        done, pending = await asyncio.wait(tasks, timeout=cap)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        run.complete = not pending
        for t in done:
            t.result()
        run.seconds = time.monotonic() - t0
    return run


def write_keys(path: Path, n: int) -> list[str]:
    keys = [f"storm-key-{i:03d}" for i in range(n)]
    lines = ["keys:"]
    for i, k in enumerate(keys):
        lines += [f"  - sha256: {hashlib.sha256(k.encode()).hexdigest()}", f"    agent: storm-{i:03d}"]
    path.write_text("\n".join(lines) + "\n")
    return keys


def start_regate(tmp: Path, upstream: str, keys_path: Path, breakers: dict) -> tuple[subprocess.Popen, str, str]:
    port, admin = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token": ADMIN_TOKEN},
        "auth": {"mode": "api_key", "keys": str(keys_path)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "limits": {"enabled": False},
        "audit": {"dir": str(tmp / "audit")},
        "breakers": breakers,  # {}: the defaults
        "tools": [{"name": "search", "upstream": upstream}],
    }
    path = tmp / "regate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "regate.log"
    with open(log, "wb") as out:  # a file, not a pipe nobody reads
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path), "--log-level", "warning"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"Regate did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="retry-storm-") as d:
        tmp = Path(d)
        flaky = FlakyUpstream()
        regate = None
        try:
            for lane in ("direct", "regate"):
                flaky.mode(lane, "hash", field="table", ratio=args.fail_ratio, status=400, message=ERROR_MESSAGE)
            keys_path = tmp / "keys.yaml"
            keys = write_keys(keys_path, args.agents)
            regate, regate_url, admin_url = start_regate(tmp, flaky.lane_url("regate"), keys_path, args.breakers)

            say(f"run 1: {args.agents} agents straight at the tool for {args.seconds:g}s ...")
            direct = await run_agents("direct", flaky.lane_url("direct") + "/query", None, args,
                                      seconds=args.seconds)
            direct.upstream = flaky.stats("direct")
            work = [len(log) for log in direct.agents]
            say(f"run 2: the same {sum(work)} intents through Regate (at most "
                f"{args.seconds * args.max_factor:g}s) ...")
            guarded = await run_agents("regate", f"{regate_url}/tools/search/query", keys, args, intents=work)
            guarded.upstream = flaky.stats("regate")
            rejections = _get(f"{admin_url}/admin/breakers")["rejections"]
        finally:
            if regate is not None:
                stop(regate)
            flaky.stop()

    # The work both runs finished: each agent's first intents, as many as it got through Regate.
    prefix = [len(log) for log in guarded.agents]
    d_sum, g_sum = summarise(direct, prefix), summarise(guarded, prefix)
    same = all([i.succeeded for i in direct.agents[a][:n]] == [i.succeeded for i in guarded.agents[a][:n]]
               for a, n in enumerate(prefix))
    calls_ratio = d_sum["tool_calls"] / max(1, g_sum["tool_calls"])
    fail_ratio = d_sum["tool_failures"] / max(1, g_sum["tool_failures"])
    # The client's own count must match the tool's (every call the tool answered, once).
    return {
        "settings": {"agents": args.agents, "seconds": args.seconds, "tries": args.tries, "agent": args.agent,
                     "think_ms": args.think_ms, "fail_ratio": args.fail_ratio, "seed": args.seed,
                     "breakers": args.breakers},
        "work": {"intents_started_direct": sum(work), "intents_compared": sum(prefix),
                 "regate_run_complete": guarded.complete,
                 "wall_s": {"direct": round(direct.seconds, 1), "regate": round(guarded.seconds, 1)}},
        "direct": d_sum,
        "regate": g_sum,
        "regate_rejections": rejections,
        # None when the Regate run was stopped: calls cut off mid-flight may have reached the tool.
        "tool_counts_agree": (direct.tool_calls_seen[0] == direct.upstream["calls"]
                              and guarded.tool_calls_seen[0] == guarded.upstream["calls"])
                             if guarded.complete else None,
        "tool_calls_ratio": round(calls_ratio, 2),
        "failed_tool_calls_ratio": round(fail_ratio, 2),
        "same_successes": same,
        "target_met": calls_ratio >= 5 and same,
    }


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def render(r: dict) -> str:
    d, g, w, s = r["direct"], r["regate"], r["work"], r["settings"]
    rows = [
        ("distinct calls (intents)", d["intents"], g["intents"]),
        ("  could succeed", d["could_succeed"], g["could_succeed"]),
        ("  succeeded", d["succeeded"], g["succeeded"]),
        ("requests the agents sent", d["agent_sends"], g["agent_sends"]),
        ("**calls the tool received**", d["tool_calls"], g["tool_calls"]),
        ("  of which failed (400)", d["tool_failures"], g["tool_failures"]),
        ("refusals of calls that could succeed", d["refusals_of_calls_that_could_succeed"],
         g["refusals_of_calls_that_could_succeed"]),
        ("time to success p50 / p99 (s)", f"{d['success_latency_p50_s']} / {d['success_latency_p99_s']}",
         f"{g['success_latency_p50_s']} / {g['success_latency_p99_s']}"),
        ("agents' Retry-After waits, total (s)", d["agent_wait_s"], g["agent_wait_s"]),
        ("intents finished per second (whole run)", d["intents_per_s"], g["intents_per_s"]),
    ]
    out = [f"retry storm: {s['agents']} {s['agent']} agents, tool fails {s['fail_ratio']:.0%} of distinct calls "
           f"(400, by argument), agents give up after {s['tries']} tries, think {s['think_ms']:g} ms, "
           f"breakers: {s['breakers'] or 'defaults'}",
           f"direct run {w['wall_s']['direct']}s ({w['intents_started_direct']} intents); Regate run "
           f"{w['wall_s']['regate']}s{'' if w['regate_run_complete'] else ' (stopped at its time cap)'}; "
           f"compared: the {w['intents_compared']} intents both finished",
           "", "| | direct | through Regate |", "|---|---:|---:|"]
    out += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    out += ["", f"Regate refusals: {g['refusals']}",
            f"calls reaching the tool: {r['tool_calls_ratio']}x fewer through Regate "
            f"(failing calls: {r['failed_tool_calls_ratio']}x fewer)",
            f"every call that could succeed did, in both runs: {r['same_successes']}",
            f"agents' and tool's call counts agree: "
            f"{'n/a (run stopped)' if r['tool_counts_agree'] is None else r['tool_counts_agree']}",
            f"target (>= 5x fewer calls, no success lost): {'met' if r['target_met'] else 'NOT met'}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.retry_storm", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the direct run (default 60)")
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--tries", type=int, default=20, help="tries per call before an agent moves on (default 20)")
    ap.add_argument("--think-ms", type=float, default=100.0, help="mean pause before each send (default 100)")
    ap.add_argument("--agent", choices=("stubborn", "listening"), default="stubborn",
                    help="stubborn: a retry_loop refusal is one more failed try, it keeps editing; "
                         "listening: it stops retrying that call (default stubborn)")
    ap.add_argument("--fail-ratio", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-factor", type=float, default=3.0,
                    help="stop the Regate run after this many times --seconds (default 3); the comparison "
                         "then covers the intents it finished")
    ap.add_argument("--breakers", type=json.loads, default={},
                    help="the breakers: section for Regate, as JSON (default {}: the shipped defaults)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    result = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["same_successes"] else 1


if __name__ == "__main__":
    sys.exit(main())
