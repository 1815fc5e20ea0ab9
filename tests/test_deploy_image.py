"""The container image, proved without a Docker engine by doing what the Dockerfile says.

The Dockerfile is parsed, not restated: its build stage's COPY sources become a
source tree and the wheel is built from it; `python -m venv` and the hashed
`pip install -r requirements.lock` run as written (from wheels downloaded once into
.tools/wheels, then offline); the final stage's COPY, RUN mkdir/chown, ENV,
WORKDIR, USER, VOLUME, STOPSIGNAL, HEALTHCHECK, ENTRYPOINT and CMD are laid out
under a scratch root directory, every absolute image path mapped below it (what
the container's mount namespace does). Regate then runs as the image's numeric
user (setpriv, when the tests run as root) with the image's environment, working
directory and command, and must answer /healthz, /readyz, an allowed and a
denied call, pass its HEALTHCHECK, and drain a call in flight on STOPSIGNAL.

A Dockerfile instruction this file does not understand fails the test: teach it
here rather than let the two drift apart.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
WHEELS = REPO / ".tools" / "wheels"
AGENT_KEY = "image-test-key-coder-7"


# ---- reading the Dockerfile -------------------------------------------------------

def parse_dockerfile(text: str) -> list[dict]:
    """Stages: [{"name", "base", "steps": [(INSTRUCTION, rest)]}], continuations joined."""
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    stages: list[dict] = []
    for line in logical:
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        rest = rest.strip()
        if instr == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "base": parts[0], "steps": []})
        else:
            assert stages, f"{instr} before FROM"
            stages[-1]["steps"].append((instr, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {rest}"
    return value


def copy_args(rest: str) -> tuple[str | None, list[str], str]:
    words = shlex.split(rest)
    source_stage = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--from="):
            source_stage = flag.split("=", 1)[1]
        else:
            raise AssertionError(f"COPY flag {flag} is not understood by {__file__}")
    assert len(words) >= 2, f"COPY needs a source and a destination: {rest}"
    return source_stage, words[:-1], words[-1]


def env_pairs(rest: str, current: dict[str, str]) -> dict[str, str]:
    out = {}
    for word in shlex.split(rest):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {word}: use the KEY=VALUE form"
        out[key] = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: current.get(m.group(1), ""), value)
    return out


def stages() -> list[dict]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> dict:
    return stages()[-1]


def build_stage() -> dict:
    (stage,) = [s for s in stages() if s["name"] == "build"]
    return stage


def dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    for pat in patterns:
        p = pat.rstrip("/")
        if fnmatch.fnmatch(rel, p) or rel.startswith(p + "/") or fnmatch.fnmatch(rel, p.replace("**/", "")):
            return True
    return False


# ---- static checks -----------------------------------------------------------------

def test_every_copied_file_exists_and_is_in_the_build_context():
    patterns = dockerignore()
    context_copies = 0
    for stage in stages():
        for instr, rest in stage["steps"]:
            if instr != "COPY":
                continue
            source_stage, sources, _ = copy_args(rest)
            if source_stage is not None:
                assert any(s["name"] == source_stage for s in stages()), f"COPY --from={source_stage}: no such stage"
                continue
            for src in sources:
                context_copies += 1
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
                assert not ignored(src, patterns), f".dockerignore excludes {src}, which the Dockerfile copies"
    assert context_copies >= 6


def test_image_runs_as_numeric_non_root_user_with_health_check_and_drain_signal():
    steps = final_stage()["steps"]
    kinds = [i for i, _ in steps]
    (user,) = [r for i, r in steps if i == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), f"USER {user}: numeric, not root (runAsNonRoot)"
    assert [r for i, r in steps if i == "STOPSIGNAL"] == ["SIGTERM"]
    (health,) = [r for i, r in steps if i == "HEALTHCHECK"]
    assert "/etc/regate/regate.yaml" in health and "healthcheck" in health
    assert "VOLUME" in kinds
    cfg = yaml.safe_load((REPO / "deploy/container/regate.yaml").read_text())
    # Docker's default stop timeout is 10 s: the drain must fit inside it.
    assert cfg["http"]["shutdown_grace_s"] < 10
    ports = re.findall(r"\$\{[A-Z_]+:-(\d+)\}", cfg["listen"] + " " + cfg["admin"]["listen"])
    (expose,) = [r for i, r in steps if i == "EXPOSE"]
    assert sorted(expose.split()) == sorted(ports), "EXPOSE and the config's default ports differ"
    assert cfg["listen"].startswith("0.0.0.0:") and cfg["admin"]["listen"].startswith("0.0.0.0:")


def test_opa_is_built_from_source_at_the_makefile_version():
    (opa,) = [s for s in stages() if s["name"] == "opa"]
    args = dict(r.split("=", 1) for i, r in opa["steps"] if i == "ARG")
    make = re.search(r"^OPA_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert make and args["OPA_VERSION"] == make.group(1)
    assert any("go install github.com/open-policy-agent/opa@v${OPA_VERSION}" in r for i, r in opa["steps"] if i == "RUN")


def test_lock_pins_every_dependency_with_hashes():
    text = LOCK.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    assert pins, "requirements.lock pins nothing"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text)
    for block in blocks:
        if re.match(r"[A-Za-z0-9]", block):
            assert "--hash=sha256:" in block, f"requirements.lock: {block.split()[0]} has no hash"
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    norm = {re.sub(r"[-_.]+", "-", k).lower() for k in pins}
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0)).lower()
        assert name in norm, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"


# ---- the wheel ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from exactly what the build stage copies, as the build stage builds it."""
    src = tmp_path_factory.mktemp("src")
    for instr, rest in build_stage()["steps"]:
        if instr == "COPY":
            stage, sources, dest = copy_args(rest)
            if stage is None and dest.startswith("/src"):
                for s in sources:
                    target = src / dest[len("/src"):].lstrip("/")
                    if (REPO / s).is_dir():
                        shutil.copytree(REPO / s, target, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(REPO / s, target / Path(s).name)
    out = tmp_path_factory.mktemp("wheel")
    # In an isolated build environment, as `pip install /src` in the image builds it,
    # with pyproject.toml's build requirements from .tools/wheels (fetched once).
    import tomllib

    build_requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
           "--no-index", "--find-links", str(WHEELS), "-w", str(out), str(src)]
    if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", "-d", str(WHEELS), *build_requires], check=True, timeout=300)
        subprocess.run(cmd, check=True, timeout=120)
    (whl,) = out.glob("regate-*.whl")
    return whl


def runtime_files() -> set[str]:
    """Files below proxy/ the code may open at run time: every non-Python file, and every
    file name a module that reads `__file__` spells as a string literal."""
    found = set()
    for path in (REPO / "proxy").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".py", ".pyc"):
            found.add(path.relative_to(REPO).as_posix())
    for mod in (REPO / "proxy").rglob("*.py"):
        text = mod.read_text()
        if "__file__" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            # Path(__file__).parent / "page.html", os.path.join(os.path.dirname(__file__), "x.json")
            if isinstance(node, ast.BinOp):
                operands, names = [node.right], node.left
            elif isinstance(node, ast.Call):
                operands, names = node.args, node
            else:
                continue
            if not any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(names)):
                continue
            for c in operands:
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.fullmatch(r"[\w./-]+\.\w+", c.value):
                    found.add((mod.parent / c.value).relative_to(REPO).as_posix())
    return found


def test_wheel_holds_every_file_the_code_opens_at_run_time(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = runtime_files()
    assert {"proxy/observability/overview.html", "proxy/approvals/inbox.html"} <= wanted
    missing = sorted(wanted - names)
    assert not missing, f"the wheel lacks {missing}: declare them in pyproject.toml [tool.setuptools.package-data]"
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names)
    from proxy.version import __version__

    assert f"regate-{__version__}-" in wheel.name


# ---- the image, run ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tool(http.server.BaseHTTPRequestHandler):
    """The tools behind the image: /<tool>/... answers JSON; /search/slow takes 2 s."""

    started = threading.Event()

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/search/slow"):
            _Tool.started.set()
            time.sleep(2.0)
        body = json.dumps({"tool": "ok", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def _call(url: str, method: str = "GET", body: dict | None = None, key: str | None = AGENT_KEY,
          timeout: float = 10) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["X-Api-Key"] = key
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _install_wheels(venv_python: Path, pip_args: list[str]) -> None:
    """The Dockerfile's `pip install` from the lock: offline from .tools/wheels, which is
    filled once from PyPI (hash-checked) when a pinned wheel is missing."""
    cmd = [str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
           "--no-index", "--find-links", str(WHEELS), *pip_args]
    if subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0:
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "--require-hashes", "-r", str(LOCK), "-d", str(WHEELS)],
                   check=True, timeout=300)
    subprocess.run(cmd, check=True, timeout=300)


def _map(root: Path, value: str, laid: list[str]) -> str:
    """An image path, as it lies below `root`; other words unchanged."""
    parts = []
    for part in value.split(":"):
        if part.startswith("/") and any(part == p or part.startswith(p.rstrip("/") + "/") for p in laid):
            part = str(root) + part
        parts.append(part)
    return ":".join(parts)


def test_image_serves_checks_health_and_drains(wheel, tmp_path):
    steps = final_stage()["steps"]
    root = Path(tempfile.mkdtemp(prefix="regate-image-"))
    os.chmod(root, 0o755)  # the image's user must reach everything below it
    try:
        user = [r for i, r in steps if i == "USER"][0]
        uid, gid = (int(x) for x in user.split(":"))
        laid: list[str] = []

        # The build stage: the virtualenv, the locked dependencies, Regate's wheel.
        venv = None
        for instr, rest in build_stage()["steps"]:
            if instr != "RUN":
                continue
            m = re.fullmatch(r"python -m venv (\S+)", rest)
            if m:
                venv = m.group(1)
                subprocess.run([sys._base_executable, "-m", "venv", str(root) + venv], check=True, timeout=120)
                continue
            words = shlex.split(rest)
            assert venv and words[0] == venv + "/bin/pip" and words[1] == "install", \
                f"build stage RUN not understood by {__file__}: {rest}"
            args = [w for w in words[2:] if w != "--no-cache-dir"]
            if "-r" in args:
                args[args.index("-r") + 1] = str(LOCK)
                _install_wheels(Path(str(root) + venv) / "bin/python", args)
            else:
                assert args == ["--no-deps", "/src"], f"build stage RUN not understood: {rest}"
                _install_wheels(Path(str(root) + venv) / "bin/python", ["--no-deps", str(wheel)])
        assert venv is not None

        # The final stage, instruction by instruction.
        env = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/"}
        workdir = "/"
        volumes: list[str] = []
        for instr, rest in steps:
            if instr == "COPY":
                stage, sources, dest = copy_args(rest)
                if stage == "build":
                    assert sources == [venv] and dest == venv
                    laid.append(dest)
                elif stage == "opa":
                    opa = REPO / ".tools/bin/opa"
                    if opa.exists():  # built by `make opa`; Regate itself does not run it
                        (root / dest.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(opa, root / dest.lstrip("/"))
                    laid.append(dest)
                else:
                    assert stage is None, f"COPY --from={stage} not understood by {__file__}"
                    for src in sources:
                        s = REPO / src
                        target = root / dest.lstrip("/")
                        if s.is_dir():
                            shutil.copytree(s, target, dirs_exist_ok=True,
                                            ignore=shutil.ignore_patterns("__pycache__"))
                        elif dest.endswith("/"):
                            target.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(s, target / s.name)
                        else:
                            target.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(s, target)
                    laid.append(dest.rstrip("/") or "/")
            elif instr == "RUN":
                m = re.fullmatch(r"mkdir -p (\S+) && chown -R (\d+):(\d+) (\S+)", rest)
                assert m, f"final stage RUN not understood by {__file__}: {rest}"
                (root / m.group(1).lstrip("/")).mkdir(parents=True, exist_ok=True)
                laid.append(m.group(4))
                if os.geteuid() == 0:
                    for dirpath, dirnames, filenames in os.walk(root / m.group(4).lstrip("/")):
                        for name in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                            os.chown(name, int(m.group(2)), int(m.group(3)))
                for p in (root / m.group(4).lstrip("/")).parents:
                    if p == root:
                        break
                    os.chmod(p, 0o755)
            elif instr == "ENV":
                env.update(env_pairs(rest, env))
            elif instr == "WORKDIR":
                workdir = rest
            elif instr == "VOLUME":
                volumes.extend(rest.split())
            elif instr not in ("USER", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD"):
                raise AssertionError(f"final stage {instr} not understood by {__file__}")
        for d in root.rglob("*"):
            if d.is_dir() and not d.stat().st_uid == uid:
                os.chmod(d, d.stat().st_mode | 0o755)
        env = {k: _map(root, v, laid) for k, v in env.items()}
        for v in volumes:
            assert (root / v.lstrip("/")).is_dir(), f"VOLUME {v} is not created by the image"
        entrypoint = exec_form([r for i, r in steps if i == "ENTRYPOINT"][0])
        cmd = exec_form([r for i, r in steps if i == "CMD"][0])
        health = [r for i, r in steps if i == "HEALTHCHECK"][0]
        health_cmd = exec_form(health[health.index("CMD") + 3:].strip())
        stop = getattr(signal, [r for i, r in steps if i == "STOPSIGNAL"][0])

        # What `docker run -p ... -e ... -v keys.yaml:/etc/regate/keys.yaml` adds.
        port, admin_port = _free_port(), _free_port()
        tool_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tool)
        threading.Thread(target=tool_server.serve_forever, daemon=True).start()
        env.update(REGATE_PORT=str(port), REGATE_ADMIN_PORT=str(admin_port),
                   REGATE_TOOLS_URL=f"http://127.0.0.1:{tool_server.server_port}")
        digest = hashlib.sha256(AGENT_KEY.encode()).hexdigest()
        (root / "etc/regate/keys.yaml").write_text(f"keys:\n  - sha256: {digest}\n    agent: coder-7\n")

        def as_image_user(argv: list[str]) -> list[str]:
            exe = shutil.which(argv[0], path=env["PATH"])
            assert exe, f"{argv[0]} is not on the image's PATH {env['PATH']}"
            argv = [exe, *(_map(root, a, laid) for a in argv[1:])]
            if os.geteuid() != 0:
                return argv  # already unprivileged
            setpriv = shutil.which("setpriv")
            assert setpriv, "setpriv (util-linux) is needed to run the image's command as its user"
            return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]

        cwd = _map(root, workdir, laid)
        proc = subprocess.Popen(as_image_user(entrypoint + cmd), env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
            deadline = time.monotonic() + 30
            while True:
                probe = subprocess.run(as_image_user(health_cmd), env=env, cwd=cwd, capture_output=True, timeout=10)
                if probe.returncode == 0:
                    break
                assert proc.poll() is None, f"regate exited: {proc.stdout.read().decode()}"
                assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {probe.stderr.decode()}"
                time.sleep(0.2)

            from proxy.version import __version__

            assert _call(admin + "/healthz", key=None) == (200, {"status": "ok", "version": __version__})
            version = subprocess.run(as_image_user([*entrypoint, "--version"]), env=env, cwd=cwd,
                                     capture_output=True, text=True, timeout=30)
            assert version.stdout.strip() == f"regate {__version__}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            metrics = opener.open(admin + "/metrics", timeout=10).read().decode()
            assert re.search(r'^regate_build_info\{[^}]*version="%s"[^}]*\} 1\.0$' % re.escape(__version__),
                             metrics, re.M), "no regate_build_info in /metrics"
            status, ready = _call(admin + "/readyz", key=None)
            assert status == 200 and ready["ready"], ready
            assert ready["policy"]["engine"] == "embedded"
            status, body = _call(base + "/tools/search/?q=regate")
            assert status == 200 and body["tool"] == "ok"
            status, body = _call(base + "/tools/payments/", "POST", {"amount": 5, "currency": "USD"})
            assert status == 403 and body["error"]["code"] == "policy_denied", body
            status, body = _call(base + "/tools/search/", key=None)
            assert status == 401

            # STOPSIGNAL with a call in flight: it finishes, then Regate exits 0.
            _Tool.started.clear()
            result: dict = {}
            slow = threading.Thread(target=lambda: result.update(r=_call(base + "/tools/search/slow")))
            slow.start()
            assert _Tool.started.wait(10)
            proc.send_signal(stop)
            slow.join(15)
            assert result.get("r", (None,))[0] == 200, result
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tool_server.shutdown()
        segments = list((root / "var/lib/regate/audit").glob("audit-*.jsonl"))
        assert segments, "no audit log on the volume"
        if os.geteuid() == 0:
            assert {s.stat().st_uid for s in segments} == {uid}
    finally:
        shutil.rmtree(root, ignore_errors=True)
