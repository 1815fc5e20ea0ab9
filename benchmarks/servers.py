"""The processes a benchmark run starts: nginx (upstream, direct target, proxy_pass
target), the aiohttp fallback upstream, the bare proxy, Regate and the real OPA
(`opa run --server`), each pinned to its CPU set with taskset and stopped by pid.

Every process writes its output to a log file in the run's temp dir (a pipe
that nobody reads would block a chatty server mid-benchmark); when a process
fails to come up, the error quotes the tail of that log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The upstream tool's answer: a small JSON body, the shape of a cheap tool call.
UPSTREAM_BODY = '{"ok":true,"tool":"echo","result":{"items":[1,2,3],"note":"benchmark upstream"}}'


class StartError(Exception):
    """A benchmark process did not come up; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    if cpus is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", cpus, *cmd]


class Proc:
    """One started process: its log, readiness wait and a stop that always reaps it."""

    def __init__(self, name: str, cmd: list[str], log: Path, cpus: str | None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cpus = cpus
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            pinned(cmd, cpus), cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 60.0, want_status: int | None = None) -> tuple[int, bytes]:
        """Poll `url` until it answers (any status below 500, or exactly `want_status`)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with {self.proc.returncode} before {url} answered:\n"
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            except OSError as exc:
                last = str(exc)
                time.sleep(0.05)
                continue
            if (want_status is None and status < 500) or status == want_status:
                return status, body
            last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(0.1)
        raise StartError(f"{self.name}: {url} did not answer within {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU of these processes and all their descendants, in seconds."""
    try:
        kids = _children()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    total, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, ()))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# -- nginx -------------------------------------------------------------------

def _nginx_conf(prefix: Path, port: int, http_body: str) -> str:
    # master_process off: one process, so taskset pins all of nginx and a
    # SIGTERM to its pid stops all of it. Every path lives under `prefix`:
    # nothing is written outside the run's temp dir.
    return f"""
worker_processes 1;
master_process off;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # Defaults close a keep-alive connection after 1000 requests, which would
    # make every load generator and proxy pool reconnect mid-run.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{http_body}
    }}
}}
"""


def _start_nginx(name: str, tmp: Path, cpus: str | None, server_body: str, upstream_block: str = "") -> tuple[Proc, int]:
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx is not installed (make bench installs it: scripts/ensure-debs.sh nginx:nginx)")
    port = free_port()
    prefix = tmp / f"nginx-{name}"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = _nginx_conf(prefix, port, server_body)
    if upstream_block:
        conf = conf.replace("    server {", upstream_block + "\n    server {", 1)
    (prefix / "nginx.conf").write_text(conf)
    proc = Proc(name, [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")],
                tmp / f"{name}.log", cpus)
    proc.log_path = prefix / "error.log"
    proc.wait_http(f"http://127.0.0.1:{port}/", timeout=15)
    return proc, port


def start_nginx_upstream(name: str, tmp: Path, cpus: str | None) -> tuple[Proc, str]:
    body = UPSTREAM_BODY.replace("'", "\\'")
    server = f"""        location / {{
            default_type application/json;
            return 200 '{body}';
        }}"""
    proc, port = _start_nginx(name, tmp, cpus, server)
    return proc, f"http://127.0.0.1:{port}"


def start_nginx_proxy(name: str, tmp: Path, cpus: str | None, upstream: str) -> tuple[Proc, str]:
    hostport = upstream.split("://", 1)[1]
    upstream_block = f"""    upstream tool {{
        server {hostport};
        keepalive 512;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}"""
    server = """        location / {
            proxy_pass http://tool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    proc, port = _start_nginx(name, tmp, cpus, server, upstream_block)
    return proc, f"http://127.0.0.1:{port}"


# -- Python servers ------------------------------------------------------------

def start_fallback_upstream(name: str, tmp: Path, cpus: str | None) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(name, [sys.executable, str(ROOT / "benchmarks/fallback_upstream.py"), "--port", str(port)],
                tmp / f"{name}.log", cpus)
    proc.wait_http(f"http://127.0.0.1:{port}/", timeout=20)
    return proc, f"http://127.0.0.1:{port}"


def start_bare_proxy(name: str, tmp: Path, cpus: str | None, upstream: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(name, [sys.executable, str(ROOT / "benchmarks/bare_proxy.py"), "--port", str(port),
                       "--upstream", upstream], tmp / f"{name}.log", cpus)
    proc.wait_http(f"http://127.0.0.1:{port}/", timeout=20)
    return proc, f"http://127.0.0.1:{port}"


def start_opa(name: str, tmp: Path, cpus: str | None, rego: Path, data: Path) -> tuple[Proc, str]:
    """The real OPA (`opa run --server`, the binary `make opa` builds or $REGATE_OPA) serving
    `rego` and `data` mounted as Regate mounts them (tests/support/opa_server.py knows how)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support.opa_server import OpaMissing, opa_binary, shipped_paths

    try:
        binary = opa_binary()
    except OpaMissing as exc:
        raise StartError(str(exc)) from None
    port = free_port()
    cmd = [binary, "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error",
           "--skip-version-check", "--shutdown-grace-period", "1", *shipped_paths(rego, data)]
    proc = Proc(name, cmd, tmp / f"{name}.log", cpus)
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60, want_status=200)
    return proc, f"http://127.0.0.1:{port}"


def _wait_port(proc: Proc, port: int, what: str, timeout: float) -> None:
    """Until `port` accepts a connection; stops the process and says why if it never does."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise StartError(f"{what} did not listen on {port}: {proc.log_tail()}")


def start_otlp_sink(name: str, tmp: Path, cpus: str | None) -> tuple[Proc, str]:
    """An OTLP/HTTP endpoint that answers 200 and decodes nothing: tracing's cost is Regate's alone."""
    port = free_port()
    proc = Proc(name, [sys.executable, str(ROOT / "tests/support/otlp_collector.py"), str(port)],
                tmp / f"{name}.log", cpus)
    _wait_port(proc, port, "the OTLP sink", 30)
    return proc, f"http://127.0.0.1:{port}/v1/traces"


def start_redis(name: str, tmp: Path, cpus: str | None) -> tuple[Proc, str]:
    """A real redis-server (Debian package) on a free port, no persistence, for the shared limits store."""
    import shutil

    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if binary is None:
        raise StartError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    workdir = tmp / name
    workdir.mkdir(parents=True, exist_ok=True)
    proc = Proc(name, [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", str(workdir)], tmp / f"{name}.log", cpus)
    _wait_port(proc, port, "redis-server", 20)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_regate(name: str, tmp: Path, cpus: str | None, config_yaml: str, port: int, admin_port: int,
                 workers: int = 1, timeout: float = 180.0) -> tuple[Proc, str, dict]:
    """`regate serve` with the given config; returns the process, its URL and /readyz's answer."""
    import orjson

    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(config_yaml)
    cmd = [sys.executable, "-m", "proxy", "serve", "-c", str(cfg_path), "--log-level", "warning"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = Proc(name, cmd, tmp / f"{name}.log", cpus)
    _, body = proc.wait_http(f"http://127.0.0.1:{admin_port}/readyz", timeout=timeout, want_status=200)
    try:
        ready = orjson.loads(body)
    except orjson.JSONDecodeError:
        ready = {}
    # With --workers N only worker 0 serves the admin port. Wait until every
    # worker has its own SO_REUSEPORT listener: wrk's connections live for the
    # whole run, and a worker that binds late would get none of them.
    if workers > 1:
        _wait_listeners(proc, port, workers, timeout)
    return proc, f"http://127.0.0.1:{port}", ready


def _listeners(port: int) -> int | None:
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def _wait_listeners(proc: Proc, port: int, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise StartError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log_tail()}")
        n = _listeners(port)
        if n is None:
            time.sleep(2.0)  # no ss: give the other workers time to bind
            return
        if n >= want:
            return
        time.sleep(0.1)
    raise StartError(f"{proc.name}: only {_listeners(port)} of {want} workers listen on :{port}\n{proc.log_tail()}")
