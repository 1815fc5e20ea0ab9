"""A real redis-server for tests: a free 127.0.0.1 port, a temp dir, no persistence.

    with RedisServer() as srv:      # or: srv = RedisServer(); srv.start(); ...; srv.stop()
        client = redis.asyncio.Redis.from_url(srv.url)
        srv.kill()                  # SIGKILL mid-run, to test failure handling
        srv.start()                 # back on the same port, empty

The binary comes from the Debian package ``redis-server`` (``make test`` installs
it); when it is missing the error says so rather than the tests skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def find_redis_server() -> str:
    path = shutil.which("redis-server") or ("/usr/sbin/redis-server" if os.access("/usr/sbin/redis-server", os.X_OK) else None)
    if path is None:
        raise RuntimeError("redis-server not found: install the Debian package redis-server "
                           "(apt-get install -y redis-server; `make test` does this)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = find_redis_server()
        self.extra_args = tuple(extra_args)  # e.g. ("--requirepass", "s3cret")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="regate-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
             "--loglevel", "warning", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}: {self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)  # +PONG, or -NOAUTH when a password is required
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the abrupt loss a failure test wants."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
