"""The realistic workload: distinct calls from many agents to every shipped tool.

Agents do not send one request over and over: each call has its own agent,
tool, arguments and body, so on Regate almost every decision is a fresh one
(the decision cache holds 4,096 entries; the pool of pre-generated calls is
larger and is cycled in order). What is generated, with its proportions stated:

- **Agents**: `--agents N` (10 to 100,000; default 1,000, quick 200) generated
  agents `wl-NNNNNN`, each with an API key (sha256 in the generated keys file)
  and grants on every shipped tool (shell, files under its own root, payments
  with a human above 100 USD, the `tickets` MCP server); `search` is public.
  One in twenty (at least one) is a *flooder* whose agent rate limit is 1/hour,
  so after its first call every call it makes is answered 429.
- **Call classes** (of all calls): allowed 70%, denied 15%, rate-limited 10%,
  approval-needing 5% (`CLASS_MIX`). Approvals are `mode: async`, so they are
  answered 202 at once (a held call would wait 120 s for a human).
- **Allowed calls by tool** (`ALLOWED_MIX`): search GET with a query 20%,
  search POST JSON 15%, shell POST 15%, files GET 15%, files PUT 10%,
  payments 10%, MCP `tools/call` on tickets 15%. Denied calls are a shell
  command off the allowlist, a file outside the agent's root, a payment in
  BTC or above `max_amount`, an MCP tool the grant does not name.
- **Bodies**: JSON (`application/json`, UTF-8, arguments from the one place each
  tool reads them: the body for shell/payments, the query for search GET)
  sized 100 B to 100 kB: 70% in 100 B-1 kB, 25% in 1-10 kB, 5% in 10-100 kB,
  log-uniform within each band (`BODY_BANDS`), for the calls that carry a
  padding field (search POST, files PUT, MCP search_tickets).

Requests are pre-generated as raw HTTP/1.1 bytes (`requests.bin`, one length-
prefixed request after another), so the load generator only copies bytes:

- closed loop: wrk, with a Lua script that cycles through the pool (each
  connection takes the next request) and tallies response statuses;
- open loop: `python -m benchmarks.workload drive` — several processes of an
  asyncio (uvloop) client over raw sockets, each sending on a fixed schedule;
  latency is counted from the *scheduled* send time, so a target that falls
  behind shows it (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import resource
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

CLASS_MIX = {"allowed": 0.70, "denied": 0.15, "rate_limited": 0.10, "approval": 0.05}
ALLOWED_MIX = {"search_get": 0.20, "search_post": 0.15, "shell": 0.15, "files_get": 0.15, "files_put": 0.10,
               "payments": 0.10, "mcp_call": 0.15}
DENIED_KINDS = ("shell_bad", "files_outside", "payments_btc", "payments_too_much", "mcp_tool_not_granted")
BODY_BANDS = ((0.70, 100, 1_000), (0.25, 1_000, 10_000), (0.05, 10_000, 100_000))
# What each class is answered with by Regate with policy on (bare/nginx answer 200 to all).
EXPECTED_STATUS = {"allowed": 200, "denied": 403, "rate_limited": 429, "approval": 202}
SHELL_OK = ("ls -la {root}src-{n}", "cat {root}notes-{n}.md", "grep -rn todo{n} {root}src", "wc -l {root}log-{n}.txt",
            "head -n 20 {root}data-{n}.csv", "git status --short {root}repo-{n}", "ls -1 {root}dir-{n}",
            "echo build-{n}")
SHELL_BAD = ("rm -rf {root}tmp-{n}", "curl http://example.com/{n}", "sh -c 'echo {n}'", "cat /etc/passwd-{n}")
WORDS = ("invoice", "ticket", "deploy", "latency", "refund", "agent", "policy", "kernel", "budget", "retry")

# Tools as Regate routes them (names as the shipped policy knows them).
def tool_routes(upstream: str) -> list[dict]:
    return [
        {"name": "search", "upstream": f"{upstream}/search", "methods": ["GET", "POST"]},
        {"name": "shell", "upstream": f"{upstream}/shell", "methods": ["POST"],
         "content_types": ["application/json"], "arguments": "body"},
        {"name": "files", "upstream": f"{upstream}/files", "methods": ["GET", "PUT"]},
        {"name": "payments", "upstream": f"{upstream}/payments", "methods": ["POST"],
         "content_types": ["application/json"], "arguments": "body"},
        {"name": "tickets", "upstream": f"{upstream}/tickets", "protocol": "mcp"},
    ]


def agent_id(i: int) -> str:
    return f"wl-{i:06d}"


def agent_key(i: int) -> str:
    return f"wl-key-{i:06d}-{hashlib.sha256(str(i).encode()).hexdigest()[:16]}"


def flooders(agents: int) -> int:
    return max(1, agents // 20)


def grant(i: int) -> dict:
    root = f"/workspace/{agent_id(i)}/"
    return {"description": "generated workload agent", "tools": {
        "shell": {"methods": ["POST"], "timeout_ms": 10000},
        "files": {"methods": ["GET", "PUT"], "root": root},
        "payments": {"methods": ["POST"], "currencies": ["USD"], "approval_above": 100, "max_amount": 5000},
        "tickets": {"methods": ["POST", "GET", "DELETE"],
                    "mcp_methods": ["initialize", "notifications/initialized", "ping", "tools/list", "tools/call"],
                    "mcp_tools": ["search_tickets", "add_comment"]},
    }}


def limits_doc(agents: int) -> dict:
    """Limits that never refuse an ordinary agent, and refuse a flooder after its first call."""
    big = {"rate": "1000000/s", "burst": 1000000}
    return {
        "defaults": {"agent": big, "tool": big, "budget": {"units": 10**15, "window": "1d"}},
        "tools": {},
        "agents": {agent_id(i): {"agent": {"rate": "1/h", "burst": 1}} for i in range(flooders(agents))},
    }


def write_keys(path: Path, agents: int, extra: tuple[tuple[str, str], ...] = ()) -> Path:
    lines = ["keys:"]
    for key, agent in extra:
        lines += [f"  - sha256: {hashlib.sha256(key.encode()).hexdigest()}", f"    agent: {agent}"]
    for i in range(agents):
        lines += [f"  - sha256: {hashlib.sha256(agent_key(i).encode()).hexdigest()}", f"    agent: {agent_id(i)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the calls -----------------------------------------------------------------

def _pick(rng: random.Random, mix: dict[str, float]) -> str:
    x, acc = rng.random(), 0.0
    for k, p in mix.items():
        acc += p
        if x < acc:
            return k
    return next(reversed(mix))


def body_size(rng: random.Random) -> int:
    x, acc = rng.random(), 0.0
    for p, lo, hi in BODY_BANDS:
        acc += p
        if x < acc:
            break
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _pad(doc: dict, size: int, field: str = "context") -> bytes:
    """`doc` as JSON, with a string field grown so the whole body is about `size` bytes."""
    base = orjson.dumps({**doc, field: ""})
    n = max(0, size - len(base))
    return orjson.dumps({**doc, field: ("lorem ipsum " * (n // 12 + 1))[:n]})


def _raw(method: str, path: str, agent: int, body: bytes | None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"X-Api-Key: {agent_key(agent)}",
            f"X-Agent-Id: {agent_id(agent)}"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")


def _mcp(n: int, tool: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def make_call(rng: random.Random, n: int, agents: int) -> tuple[str, str, bytes]:
    """One call: (class, kind, raw request bytes)."""
    cls = _pick(rng, CLASS_MIX)
    nf = flooders(agents)
    if cls == "rate_limited":
        a = rng.randrange(nf)
        return cls, "flooder_search", _raw("GET", f"/tools/search/q?q={rng.choice(WORDS)}{n}", a, None)
    a = rng.randrange(nf, agents) if agents > nf else 0
    root = f"/workspace/{agent_id(a)}/"
    word = f"{rng.choice(WORDS)}{n}"
    if cls == "approval":
        amount = rng.randint(101, 5000)
        body = orjson.dumps({"amount": amount, "currency": "USD", "to": f"acct-{n}", "memo": word})
        return cls, "payments_approval", _raw("POST", "/tools/payments/pay", a, body)
    if cls == "denied":
        kind = rng.choice(DENIED_KINDS)
        if kind == "shell_bad":
            body = orjson.dumps({"command": rng.choice(SHELL_BAD).format(root=root, n=n)})
            return cls, kind, _raw("POST", "/tools/shell/run", a, body)
        if kind == "files_outside":
            return cls, kind, _raw("GET", f"/tools/files/workspace/wl-other/{word}.txt", a, None)
        if kind == "payments_btc":
            body = orjson.dumps({"amount": rng.randint(1, 99), "currency": "BTC", "to": f"acct-{n}"})
            return cls, kind, _raw("POST", "/tools/payments/pay", a, body)
        if kind == "payments_too_much":
            body = orjson.dumps({"amount": rng.randint(5001, 10**6), "currency": "USD", "to": f"acct-{n}"})
            return cls, kind, _raw("POST", "/tools/payments/pay", a, body)
        body = orjson.dumps(_mcp(n, "delete_ticket", {"ticket": f"T-{n}"}))
        return cls, kind, _raw("POST", "/tools/tickets/mcp", a, body)
    kind = _pick(rng, ALLOWED_MIX)
    if kind == "search_get":
        return cls, kind, _raw("GET", f"/tools/search/q?q={word}&limit={rng.randint(1, 50)}", a, None)
    if kind == "search_post":
        body = _pad({"query": word, "limit": rng.randint(1, 50)}, body_size(rng))
        return cls, kind, _raw("POST", "/tools/search/query", a, body)
    if kind == "shell":
        body = orjson.dumps({"command": rng.choice(SHELL_OK).format(root=root, n=n)})
        return cls, kind, _raw("POST", "/tools/shell/run", a, body)
    if kind == "files_get":
        return cls, kind, _raw("GET", f"/tools/files{root}{word}.txt", a, None)
    if kind == "files_put":
        body = _pad({"mode": "overwrite"}, body_size(rng), "content")
        return cls, kind, _raw("PUT", f"/tools/files{root}{word}.txt", a, body)
    if kind == "payments":
        body = orjson.dumps({"amount": rng.randint(1, 100), "currency": "USD", "to": f"acct-{n}", "memo": word})
        return cls, kind, _raw("POST", "/tools/payments/pay", a, body)
    if rng.random() < 0.5:
        call = _mcp(n, "search_tickets", {"query": word})
        body = _pad(call["params"]["arguments"], body_size(rng), "context")
        call["params"]["arguments"] = orjson.loads(body)
    else:
        call = _mcp(n, "add_comment", {"ticket": f"T-{n}", "text": f"comment {word} " * rng.randint(1, 100)})
    return cls, kind, _raw("POST", "/tools/tickets/mcp", a, orjson.dumps(call))


@dataclass
class Workload:
    dir: Path
    agents: int
    requests: int
    pool: Path          # requests.bin: u32 length + raw request, repeated
    meta: dict


def generate(dest: Path, agents: int, requests: int, seed: int = 22) -> Workload:
    """Write the request pool and its summary (`workload.json`) under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes: dict[str, int] = {}
    kinds: dict[str, int] = {}
    expected: dict[str, int] = {}
    sizes: list[int] = []
    with open(dest / "requests.bin", "wb") as f:
        for n in range(requests):
            cls, kind, raw = make_call(rng, n, agents)
            classes[cls] = classes.get(cls, 0) + 1
            kinds[kind] = kinds.get(kind, 0) + 1
            # An MCP refusal is a JSON-RPC error inside an HTTP 200, as the protocol has it.
            st = str(200 if kind == "mcp_tool_not_granted" else EXPECTED_STATUS[cls])
            expected[st] = expected.get(st, 0) + 1
            body = raw.split(b"\r\n\r\n", 1)[1]
            if body:
                sizes.append(len(body))
            f.write(struct.pack("<I", len(raw)) + raw)
    sizes.sort()
    meta = {
        "agents": agents, "flooders": flooders(agents), "requests": requests, "seed": seed,
        "class_mix": CLASS_MIX, "allowed_mix": ALLOWED_MIX, "body_bands": BODY_BANDS,
        "classes": classes, "kinds": kinds, "expected_statuses_with_policy": expected,
        "bodies": {"count": len(sizes), "min": sizes[0] if sizes else 0, "max": sizes[-1] if sizes else 0,
                   "median": sizes[len(sizes) // 2] if sizes else 0,
                   "mean": round(sum(sizes) / len(sizes)) if sizes else 0},
        "pool_bytes": (dest / "requests.bin").stat().st_size,
    }
    (dest / "workload.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Workload(dest, agents, requests, dest / "requests.bin", meta)


def read_pool(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


# -- closed loop: wrk cycling through the pool -------------------------------------

def write_wrk_script(path: Path, pool: Path) -> Path:
    """A wrk script whose request() hands out the pool's requests in order (each
    connection the next one) and whose done() prints the usual WRK_JSON line
    plus the status counts."""
    from .loadgen import _DONE, _lua_string

    lua = f"""
local reqs = {{}}
do
  local f = assert(io.open({_lua_string(str(pool))}, 'rb'))
  local data = f:read('*a')
  f:close()
  local i = 1
  while i <= #data do
    local b1, b2, b3, b4 = data:byte(i, i + 3)
    local n = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
    reqs[#reqs + 1] = data:sub(i + 4, i + 3 + n)
    i = i + 4 + n
  end
end
local idx = 0
statuses = {{}}
threads = {{}}
setup = function(thread) table.insert(threads, thread) end
init = function(args) idx = math.random(0, #reqs - 1) end
request = function()
  idx = idx % #reqs + 1
  return reqs[idx]
end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
"""
    done = _DONE.replace("done = function(summary, latency, requests)",
                         "done = function(summary, latency, requests)\n"
                         "  local parts = {}\n"
                         "  for _, t in ipairs(threads) do\n"
                         "    for s, n in pairs(t:get('statuses')) do\n"
                         "      parts[#parts + 1] = string.format('\"%d\":%d', s, n)\n"
                         "    end\n"
                         "  end\n"
                         "  io.write('WRK_STATUS {' .. table.concat(parts, ',') .. '}\\n')")
    path.write_text(lua + done)
    return path


# -- open loop: a multi-process asyncio client on raw sockets -----------------------

async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = None, False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _drive(host: str, port: int, pool: list[bytes], start: int, step: int, rate: float, duration: float,
                 conns: int, t0: float) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = {"connect": 0, "read": 0}

    async def worker() -> None:
        reader = writer = None
        while True:
            item = await queue.get()
            if item is None:
                break
            i, t_sched = item
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(pool[i % len(pool)])
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors["read"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            lat.append(time.perf_counter() - t_sched)
            statuses[status] = statuses.get(status, 0) + 1
        if writer is not None:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    total = int(rate * duration)
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1)
        while sent < due:
            queue.put_nowait((start + sent * step, t0 + sent / rate))
            sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
    # Calls still queued at the end are waited for (bounded), their latency counted.
    for _ in workers:
        queue.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=max(5.0, duration))
    except TimeoutError:
        errors["read"] += queue.qsize()
    return {"lat": lat, "statuses": statuses, "errors": errors, "scheduled": total}


def _child(args: argparse.Namespace, idx: int, t0: float, out_path: str) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    pool = read_pool(Path(args.pool))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    r = asyncio.run(_drive(args.host, args.port, pool, idx + args.offset, args.procs, args.rate / args.procs,
                           args.duration, args.conns, t0))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # The sending loop's own CPU (not the interpreter's start-up or reading the pool).
    r["cpu_s"] = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    Path(out_path).write_bytes(orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS))


def percentile(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def drive(args: argparse.Namespace) -> dict:
    """Open loop: `procs` processes send `rate` calls/s in total on a fixed schedule."""
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("fork")
    t0 = time.perf_counter() + 0.3  # every process starts on the same schedule
    tmpdir = Path(tempfile.mkdtemp(prefix="regate-openloop-"))
    procs = [ctx.Process(target=_child, args=(args, i, t0, str(tmpdir / f"{i}.json"))) for i in range(args.procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.duration + 60)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    errors = {"connect": 0, "read": 0}
    cpu = 0.0
    scheduled = 0
    for i in range(args.procs):
        path = tmpdir / f"{i}.json"
        if not path.exists():
            errors["read"] += 1
            continue
        r = orjson.loads(path.read_bytes())
        lat.extend(r["lat"])
        for k, v in r["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
        for k, v in r["errors"].items():
            errors[k] += v
        cpu += r["cpu_s"]
        scheduled += r["scheduled"]
        path.unlink()
    tmpdir.rmdir()
    lat.sort()
    us = lambda p: round(percentile(lat, p) * 1e6, 1)  # noqa: E731
    return {"rate": args.rate, "duration_s": args.duration, "procs": args.procs, "conns_per_proc": args.conns,
            "scheduled": scheduled, "requests": len(lat), "rps": round(len(lat) / args.duration, 1),
            "p50_us": us(50), "p90_us": us(90), "p99_us": us(99), "p99.9_us": us(99.9),
            "max_us": round(lat[-1] * 1e6, 1) if lat else 0.0, "statuses": statuses, "errors": errors,
            "error_count": sum(errors.values()),
            "client_cpu_us_per_req": round(cpu * 1e6 / len(lat), 1) if lat else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.workload", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write requests.bin and workload.json")
    g.add_argument("--out", required=True)
    g.add_argument("--agents", type=int, default=1000)
    g.add_argument("--requests", type=int, default=10000)
    d = sub.add_parser("drive", help="open-loop load at a fixed rate; prints one JSON line")
    d.add_argument("--pool", required=True)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--rate", type=float, required=True, help="calls per second, all processes together")
    d.add_argument("--duration", type=float, default=5.0)
    d.add_argument("--procs", type=int, default=2)
    d.add_argument("--conns", type=int, default=64, help="connections per process")
    d.add_argument("--offset", type=int, default=0, help="where in the pool to start")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        w = generate(Path(args.out), args.agents, args.requests)
        print(json.dumps(w.meta))
        return 0
    print("OPENLOOP_JSON " + json.dumps(drive(args)))
    return 0



def bundle(dest: Path, agents: int) -> tuple[Path, Path]:
    """The shipped Rego and data, with the workload's agents added and its limits in place."""
    from .policy_data import make_bundle, shipped_agents, write_data

    rego, data = make_bundle(dest, len(shipped_agents()))
    doc = dict(shipped_agents())
    doc.update((agent_id(i), grant(i)) for i in range(agents))
    write_data(data, "agents", doc)
    write_data(data, "limits", limits_doc(agents))
    return rego, data


if __name__ == "__main__":
    sys.exit(main())
