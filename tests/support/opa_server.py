"""The real OPA for tests and the demo: the binary, the shipped bundle's paths, a server.

The binary is OPA built from source at a pinned version (``make opa``;
``make test`` and ``make demo`` build it once and reuse it). ``REGATE_OPA`` names
another binary; a missing binary is an error that says how to build it, never a
skipped test.

    with OpaServer(*shipped_paths()) as opa:     # opa run --server on a free port
        engine = OpaEngine(opa.url, ...)
        opa.data_requests()                      # from OPA's own request log

``shipped_paths()`` is the one place that knows how the shipped bundle
(``rego/`` and ``policies/``) is handed to OPA: as the two directories, since
Regate mounts data exactly as OPA does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPA_VERSION = "1.22.4"
DEFAULT_OPA = ROOT / ".tools" / "bin" / "opa"


class OpaMissing(RuntimeError):
    pass


def opa_binary() -> str:
    """The real OPA binary: ``$REGATE_OPA``, else the one the Makefile builds."""
    path = Path(os.environ.get("REGATE_OPA") or DEFAULT_OPA)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise OpaMissing(
            f"the real OPA binary is not at {path}: build it with `make opa` (needs Go; `make test` "
            f"does it once: go install github.com/open-policy-agent/opa@v{OPA_VERSION} into .tools/bin), "
            "or point REGATE_OPA at an opa binary")
    return str(path)


def shipped_paths(rego_dir: str | Path = ROOT / "rego", data_dir: str | Path = ROOT / "policies") -> list[str]:
    """The path arguments that make ``opa run``/``opa build``/``opa eval``/``opa test``
    see Regate's bundle: the two directories, as they are.

    Data is laid out as OPA lays it out (``policies/agents/data.yaml`` ->
    ``data.agents``), so nothing needs mapping. Paths inside the checkout are
    relative to it (OPA runs there), so OPA names files as Regate does:
    ``rego/x.rego``.
    """
    return [_shown(Path(rego_dir)), _shown(Path(data_dir))]


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def build_bundle(paths: list[str], out: str | Path, revision: str | None, *,
                 signing_key: str | Path | None = None, signing_alg: str = "RS256",
                 args: tuple[str, ...] = (), sign_args: tuple[str, ...] = ()) -> Path:
    """``opa build`` of `paths` (relative ones: to the checkout) into the tarball `out`,
    its manifest saying `revision` (none: no --revision).

    With `signing_key` (a PEM private key, or the HMAC secret) the bundle is
    signed by ``opa build --bundle --signing-key``: OPA signs only bundles it
    reads as bundles, so the plain build is unpacked into a directory first and
    built again from there (module paths stay as they were: ``rego/x.rego``);
    `sign_args` go to that second build (``--claims-file``).
    """
    out = Path(out).resolve()
    rev = ["--revision", revision] if revision is not None else []
    if signing_key is None:
        _opa_build([*rev, *args, *paths], out, cwd=ROOT)
        return out
    with tempfile.TemporaryDirectory(prefix="regate-opa-build-") as tmp:
        plain = Path(tmp) / "plain.tar.gz"
        _opa_build([*args, *paths], plain, cwd=ROOT)
        stage = Path(tmp) / "bundle"
        stage.mkdir()
        with tarfile.open(plain) as tar:
            tar.extractall(stage, filter="data")
        key = signing_key if not Path(str(signing_key)).is_file() else str(Path(signing_key).resolve())
        _opa_build(["--bundle", *rev, "--signing-key", str(key), "--signing-alg", signing_alg, *sign_args, "."],
                   out, cwd=stage)
    return out


def _opa_build(argv: list[str], out: Path, cwd: Path) -> None:
    done = subprocess.run([opa_binary(), "build", "-o", str(out), *argv],
                          capture_output=True, text=True, timeout=60, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"opa build failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def opa_test(paths: list[str], *, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``opa test -v`` of `paths` (relative ones: to the checkout)."""
    return subprocess.run([opa_binary(), "test", "-v", *paths], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpaServer:
    """``opa run --server`` on 127.0.0.1:<free port>, its JSON log in a temp file.

    `paths` are what ``opa run`` loads (directories, files, ``prefix:file``;
    relative ones: to the checkout, where OPA runs);
    ``bundle=True`` loads them as bundles (``-b``: directories or ``opa build``
    tarballs, whose ``.manifest`` revision OPA reports). `args` are extra flags
    (``--authentication=token``...).
    """

    def __init__(self, *paths: str | Path, bundle: bool = False, args: tuple[str, ...] = (),
                 port: int | None = None) -> None:
        self.binary = opa_binary()
        self.paths = [str(p) for p in paths]
        self.bundle = bundle
        self.args = tuple(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="regate-opa-")
        self.log_path = Path(self.dir) / "opa.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [self.binary, "run", "--server", "--addr", f"127.0.0.1:{self.port}", "--log-format", "json",
                "--log-level", "info", "--skip-version-check", "--shutdown-grace-period", "1",
                *(["--bundle"] if self.bundle else []), *self.args, *self.paths]

    def start(self, timeout_s: float = 20.0) -> "OpaServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opa run exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                # /health answers 200 once the server listens and its bundles are activated.
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"opa run did not answer /health on {self.url} within {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    # --- changing the policy of a running OPA (not one serving a bundle: it owns the roots)

    def put_policy(self, name: str, source: str) -> None:
        """``PUT /v1/policies/<name>``: add or replace a module, e.g. one that makes the
        decision conflict (500) or slow, while Regate keeps running."""
        self._policy_request("PUT", name, source.encode())

    def delete_policy(self, name: str) -> None:
        self._policy_request("DELETE", name, None)

    def _policy_request(self, method: str, name: str, body: bytes | None) -> None:
        req = urllib.request.Request(f"{self.url}/v1/policies/{name}", data=body, method=method,
                                     headers={"Content-Type": "text/plain"})
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"OPA refused {method} /v1/policies/{name}: {exc.code} {exc.read().decode()}") from None

    # --- what OPA itself logged ---------------------------------------------------

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records

    def data_requests(self) -> list[dict]:
        """OPA's "Sent response." record of every Data API request, oldest first."""
        return [r for r in self.log_records()
                if r.get("msg") == "Sent response." and str(r.get("req_path", "")).startswith("/v1/data")]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "OpaServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
