"""Real processes for end-to-end tests: an upstream tool and Regate itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Process:
    def __init__(self, cmd: list[str], ready_url: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.ready_url = ready_url
        wait_http(ready_url, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""


def start_upstream() -> tuple[Process, str]:
    port = free_port()
    p = Process([sys.executable, str(ROOT / "tests/support/upstream_app.py"), str(port)],
                f"http://127.0.0.1:{port}/_count")
    return p, f"http://127.0.0.1:{port}"


class RegateProcess(Process):
    """`regate serve` on free ports with a config written from a dict."""

    def __init__(self, cfg: dict, tmp: Path, workers: int = 1, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.admin_port = free_port()
        cfg = dict(cfg)
        cfg.setdefault("listen", f"127.0.0.1:{self.port}")
        cfg.setdefault("admin", {})
        cfg["admin"] = {"listen": f"127.0.0.1:{self.admin_port}", "token": ADMIN_TOKEN, **cfg["admin"]}
        cfg.setdefault("audit", {"dir": str(tmp / "audit")})
        self.config_path = tmp / f"regate-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "proxy", "serve", "-c", str(self.config_path), "--log-level", "warning"]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        super().__init__(cmd + list(extra_args), f"http://127.0.0.1:{self.admin_port}/healthz")
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.admin_headers = dict(ADMIN_HEADERS)
