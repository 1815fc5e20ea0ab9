"""What is measured: the CPU layout, the targets in front of the upstream, and
the Regate configurations behind `regate-passthrough`, `regate-full` and
`regate-opa`.

CPU layout on this 2-core machine: every target runs alone on core 0; wrk,
the upstream nginx (and the OPA server for `regate-opa`) share core 1.
So a target never competes with the load generator for its core, and every
target gets the same single core. `direct` is a second copy of the upstream
pinned to core 0 like any other target, so "added latency" (target p50 −
direct p50) is what a hop through the target costs. wrk at 32 connections
uses a fraction of core 1 at Python-proxy rates, so the shared core is not
the bottleneck for the Python targets; for `direct` and `nginx` (100k+ req/s)
wrk itself is close to its limit, so their req/s are a lower bound of the
ceiling, which only makes the ratios against them kinder to Regate.
`regate-full --workers 2` is pinned to core 0 like the rest: on two cores it
shows what the multi-process mode costs, not how it scales. With four or more
cores, targets get core 0, `--workers 2` gets cores 0-1, the upstream core 2
and wrk core 3.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import servers
from .policy_data import data_file, make_bundle, shipped_agents

# The benchmark calls as coder-7 on the public `echo` tool: allowed by the
# shipped policy for every identified agent, GET and POST.
BENCH_AGENT = "coder-7"
BENCH_KEY = "bench-key-coder-7"
REQUEST_PATH = "/tools/echo/ping"
# Every target gets the same request bytes: the API key (regate-full/opa) and
# the agent header (regate-passthrough, auth none) are both always sent.
REQUEST_HEADERS = {"X-Api-Key": BENCH_KEY, "X-Agent-Id": BENCH_AGENT}

# Rate limits while benchmarking: every call is checked, none is ever refused
# (a refused call would be a wrk error, not a measurement). Written over the
# bundle's limits.yaml only when the shipped policy has one.
BENCH_LIMITS = """\
# benchmark limits: every call is checked against them, none is refused
defaults:
  agent: {rate: "1000000/s", burst: 1000000}
  tool: {rate: "1000000/s", burst: 1000000}
  budget: {units: 1000000000000, window: 1d}
"""


@dataclass(frozen=True)
class Layout:
    target: str | None
    target_multi: str | None
    upstream: str | None
    load: str | None
    aux: str | None
    note: str

    def as_dict(self) -> dict:
        return {"target_cpus": self.target, "workers2_cpus": self.target_multi, "upstream_cpus": self.upstream,
                "wrk_cpus": self.load, "opa_server_cpus": self.aux, "note": self.note}


def layout_for(ncpu: int) -> Layout:
    if ncpu >= 4:
        return Layout("0", "0,1", "2", "3", "2", "targets core 0 (workers 2: cores 0-1), upstream core 2, wrk core 3")
    if ncpu >= 2:
        return Layout("0", "0", "1", "1", "1",
                      "targets alone on core 0 (workers 2 too); wrk, upstream and OPA server share core 1")
    return Layout(None, None, None, None, None, "one CPU: nothing pinned, results are not comparable")


# -- Regate configurations ------------------------------------------------------

def passthrough_sections() -> dict:
    """regate-passthrough: every optional stage off. Identify and route always run."""
    return {
        "auth": {"mode": "none"},
        "policy": {"engine": "off"},
        "limits": {"enabled": False},
        "breakers": {"tool": {"enabled": False}, "agent": {"enabled": False}, "loop": {"enabled": False}},
        "audit": {"enabled": False},
        "metrics": False,
    }


def full_sections(run_dir: Path, rego: Path, data: Path, keys: Path) -> dict:
    """regate-full: the real configuration. One line per feature: when a feature
    lands with a config section, its line goes here (and `passthrough_sections`
    switches it off)."""
    return {
        "auth": {"mode": "api_key", "header": "X-Api-Key", "keys": str(keys)},
        "policy": {"engine": "embedded", "rego": str(rego), "data": str(data)},
        "limits": {"enabled": True, "store": "memory"},  # rates: BENCH_LIMITS in the bundle's limits.yaml
        "breakers": {},  # the defaults: tool breaker, agent backoff, loop guard on
        "audit": {"enabled": True, "dir": str(run_dir / "audit"), "fsync": "interval", "interval_ms": 50},
        "metrics": True,
    }


def regate_config(variant: str, *, port: int, admin_port: int, upstream: str, run_dir: Path,
                  rego: Path | None = None, data: Path | None = None, keys: Path | None = None,
                  opa_url: str | None = None, redis_url: str | None = None, otlp_url: str | None = None,
                  extra_tools: list[dict] | None = None) -> str:
    cfg: dict = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "http": {"shutdown_grace_s": 1},
        # 4 MiB so the 1 MB body point of the body-size curve is well inside the limit.
        "tools": [{"name": "echo", "upstream": f"{upstream}/echo", "max_body_bytes": 4 * 1024 * 1024}],
    }
    # The realistic workload's routes (benchmarks/workload.py) beside echo; its
    # approval-needing calls are answered 202 at once rather than held for a human.
    cfg["tools"] += extra_tools or []
    if variant == "passthrough":
        cfg.update(passthrough_sections())
    else:
        assert rego is not None and data is not None and keys is not None
        cfg.update(full_sections(run_dir, rego, data, keys))
        if variant == "notrace":
            cfg["observability"] = {"traces": 0}  # no trace ring: the floor tracing is measured against
        if variant == "otel":
            cfg["tracing"] = {"otlp_endpoint": otlp_url}  # a span per call + one per stage, exported
        if variant == "redis":
            # The shared store replicas use: same limits, kept in a real redis-server.
            cfg["limits"] = {**cfg["limits"], "store": "redis", "redis_url": redis_url, "timeout_ms": 200}
        if variant == "opa":
            # NOTE: timeout_ms 1000, not the default 50: at 256 connections the
            # calls queue at the single OPA server for longer than 50 ms, and a
            # run of policy_error 403s measures nothing. The errors column still
            # shows any call that waited past a second.
            cfg["policy"] = {**cfg["policy"], "engine": "opa", "opa": {"url": opa_url}, "timeout_ms": 1000}
        if extra_tools:
            cfg["approvals"] = {"mode": "async"}
    return yaml.safe_dump(cfg, sort_keys=False)


def write_keys(path: Path) -> Path:
    digest = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    path.write_text(f"keys:\n  - sha256: {digest}\n    agent: {BENCH_AGENT}\n")
    return path


def bench_bundle(dest: Path, agents: int | None = None) -> tuple[Path, Path]:
    """The shipped policy (optionally grown to `agents` agents) with benchmark limits."""
    rego, data = make_bundle(dest, agents if agents is not None else len(shipped_agents()))
    limits = data_file(data, "limits")
    if limits is not None:
        limits.unlink()
        limits.with_suffix(".yaml").write_text(BENCH_LIMITS)
    return rego, data


# -- targets -----------------------------------------------------------------

@dataclass
class Running:
    url: str
    procs: list[servers.Proc]
    info: dict = field(default_factory=dict)
    startup_s: float = 0.0

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@dataclass
class Context:
    tmp: Path
    layout: Layout
    upstream: str
    upstream_kind: str
    keys: Path
    rego: Path
    data: Path
    tools: list[dict] = field(default_factory=list)  # the workload's routes, added to every Regate


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    start: Callable[[Context], Running]


def _start_direct(ctx: Context) -> Running:
    if ctx.upstream_kind == "nginx":
        proc, url = servers.start_nginx_upstream("direct", ctx.tmp, ctx.layout.target)
    else:
        proc, url = servers.start_fallback_upstream("direct", ctx.tmp, ctx.layout.target)
    return Running(url, [proc], {"server": ctx.upstream_kind})


def _start_nginx(ctx: Context) -> Running:
    proc, url = servers.start_nginx_proxy("nginx", ctx.tmp, ctx.layout.target, ctx.upstream)
    return Running(url, [proc])


def _start_bare(ctx: Context) -> Running:
    proc, url = servers.start_bare_proxy("bare", ctx.tmp, ctx.layout.target, ctx.upstream)
    return Running(url, [proc])


def start_regate(ctx: Context, name: str, variant: str, workers: int = 1, rego: Path | None = None,
                 data: Path | None = None, aux: list[servers.Proc] | None = None,
                 opa_url: str | None = None, redis_url: str | None = None,
                 otlp_url: str | None = None) -> Running:
    import time

    port, admin_port = servers.free_port(), servers.free_port()
    run_dir = ctx.tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    text = regate_config(variant, port=port, admin_port=admin_port, upstream=ctx.upstream, run_dir=run_dir,
                         rego=rego or ctx.rego, data=data or ctx.data, keys=ctx.keys, opa_url=opa_url,
                         redis_url=redis_url, otlp_url=otlp_url, extra_tools=ctx.tools)
    cpus = ctx.layout.target_multi if workers > 1 else ctx.layout.target
    t0 = time.monotonic()
    try:
        proc, url, ready = servers.start_regate(name, run_dir, cpus, text, port, admin_port, workers)
    except Exception:
        for p in aux or []:
            p.stop()
        raise
    info = {"policy": ready.get("policy"), "workers": workers, "config": yaml.safe_load(text)}
    return Running(url, [proc, *(aux or [])], info, time.monotonic() - t0)


def _start_opa(ctx: Context) -> Running:
    opa, opa_url = servers.start_opa("opa", ctx.tmp, ctx.layout.aux, ctx.rego, ctx.data)
    return start_regate(ctx, "regate-opa", "opa", aux=[opa], opa_url=opa_url)


def _start_full_redis(ctx: Context) -> Running:
    redis, redis_url = servers.start_redis("redis", ctx.tmp, ctx.layout.aux)
    return start_regate(ctx, "regate-full-redis", "redis", aux=[redis], redis_url=redis_url)


def _start_full_otel(ctx: Context) -> Running:
    sink, otlp_url = servers.start_otlp_sink("otlp-sink", ctx.tmp, ctx.layout.aux)
    return start_regate(ctx, "regate-full-otel", "otel", aux=[sink], otlp_url=otlp_url)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("direct", "the upstream alone (nginx, small JSON): the physical floor", _start_direct),
    Target("nginx", "nginx proxy_pass with upstream keep-alive: the ceiling for a proxy here", _start_nginx),
    Target("bare", "minimal aiohttp+uvloop pass-through (benchmarks/bare_proxy.py): the Python floor", _start_bare),
    Target("regate-passthrough", "Regate, every optional stage off (auth none, policy off, no audit, no metrics)",
           lambda ctx: start_regate(ctx, "regate-passthrough", "passthrough")),
    Target("regate-full", "Regate, the real configuration: API key, shipped policy on the embedded engine, "
           "limits, breakers, audit (fsync interval), metrics",
           lambda ctx: start_regate(ctx, "regate-full", "full")),
    Target("regate-opa", "as regate-full, with the `opa` engine against the real OPA (opa run --server) "
           "(policy.timeout_ms 1000)", _start_opa),
    Target("regate-full-redis", "as regate-full, with rate limits and budgets in a real redis-server "
           "(limits.store: redis)", _start_full_redis),
    Target("regate-full-again", "regate-full started a second time, as its own control: the ratio of the two "
           "is what 'within noise' means in this run",
           lambda ctx: start_regate(ctx, "regate-full-again", "full")),
    Target("regate-full-notrace", "regate-full without the trace ring (observability.traces: 0)",
           lambda ctx: start_regate(ctx, "regate-full-notrace", "notrace")),
    Target("regate-full-otel", "regate-full exporting OTLP spans (tracing.otlp_endpoint) to a sink",
           _start_full_otel),
    Target("regate-full-w2", "regate-full with --workers 2 (SO_REUSEPORT)",
           lambda ctx: start_regate(ctx, "regate-full-w2", "full", workers=2)),
)}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
