"""Driving a target with wrk and reading what it measured.

wrk runs one thread (one core) at a fixed connection count for a fixed time,
closed-loop. A generated Lua script sets the request (method, headers, body
read from a file) and, in `done()`, prints one `WRK_JSON {...}` line with the
request count, every error class and the latency percentiles straight from
wrk's histogram — including p99.9, which wrk's `--latency` text lacks. The
text is parsed as a fallback (req/s and the 50/75/90/99 percentiles).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .servers import pinned

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,' ..
    '"p50":%.1f,"p75":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_script(path: Path, method: str = "GET", headers: dict[str, str] | None = None,
                 body_file: Path | None = None) -> Path:
    lines = [f"wrk.method = {_lua_string(method)}"]
    for k, v in (headers or {}).items():
        lines.append(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}")
    if body_file is not None:
        lines.append(f"local f = assert(io.open({_lua_string(str(body_file))}, 'rb'))")
        lines.append("wrk.body = f:read('*a')")
        lines.append("f:close()")
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


@dataclass
class WrkResult:
    connections: int
    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    max_us: float
    errors: dict[str, int] = field(default_factory=dict)
    # CPU time the target's processes spent per request during the run: unlike
    # req/s it hardly moves when other processes compete for the machine.
    cpu_us_per_req: float | None = None
    # Response statuses, when the script tallies them (the realistic workload's does).
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict:
        return {
            "connections": self.connections, "requests": self.requests, "duration_s": round(self.duration_s, 3),
            "rps": round(self.rps, 1), "p50_us": self.p50_us, "p90_us": self.p90_us, "p99_us": self.p99_us,
            "p99.9_us": self.p999_us, "mean_us": self.mean_us, "max_us": self.max_us,
            "errors": self.errors, "error_count": self.error_count, "cpu_us_per_req": self.cpu_us_per_req,
            **({"statuses": self.statuses} if self.statuses else {}),
        }


_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def parse_output(out: str, connections: int) -> WrkResult:
    """Read wrk's output: the Lua `WRK_JSON` line when present, else the `--latency` text."""
    statuses: dict[str, int] = {}
    for line in out.splitlines():
        if line.startswith("WRK_STATUS "):
            for k, v in json.loads(line[len("WRK_STATUS "):]).items():
                statuses[k] = statuses.get(k, 0) + v
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            d = json.loads(line[len("WRK_JSON "):])
            lat = d["latency_us"]
            secs = d["duration_us"] / 1e6
            return WrkResult(
                connections=connections, requests=d["requests"], duration_s=secs,
                rps=d["requests"] / secs if secs > 0 else 0.0,
                p50_us=lat["p50"], p90_us=lat["p90"], p99_us=lat["p99"], p999_us=lat["p99.9"],
                mean_us=lat["mean"], max_us=lat["max"], errors=d["errors"], statuses=statuses,
            )
    # Fallback: the plain `wrk --latency` report (no p99.9 there: p99 stands in).
    pct = {m.group(1): _to_us(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M)}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(ms|s|m)", out, re.M)
    if not (pct and rps and total):
        raise ValueError(f"unreadable wrk output:\n{out}")
    secs = float(total.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors.update(connect=int(m.group(1)), read=int(m.group(2)), write=int(m.group(3)), timeout=int(m.group(4)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors["status"] = int(m.group(1))
    mean = re.search(r"^\s+Latency\s+(\S+)\s+\S+\s+(\S+)", out, re.M)
    return WrkResult(
        connections=connections, requests=int(total.group(1)), duration_s=secs, rps=float(rps.group(1)),
        p50_us=pct["50"], p90_us=pct["90"], p99_us=pct["99"], p999_us=pct["99"],
        mean_us=_to_us(mean.group(1)) if mean else 0.0, max_us=_to_us(mean.group(2)) if mean else 0.0,
        errors=errors,
    )


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run(url: str, connections: int, duration_s: float, script: Path, cpus: str | None,
        timeout_s: float = 5.0) -> WrkResult:
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (make bench installs it: scripts/ensure-debs.sh wrk:wrk)")
    cmd = [binary, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s:g}s",
           "--latency", "-s", str(script), url]
    proc = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_output(proc.stdout, connections)
