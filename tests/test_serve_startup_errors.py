"""`regate serve` failing to start (issue 23), through the real CLI: a second Regate in
the same directory gets one line naming the audit log in use, not a traceback; a port
in use is reported as the listen address that failed; a failed start closes what it
opened (no "Unclosed client session")."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.procs import ROOT, RegateProcess, free_port

POLICY = "package regate\nimport rego.v1\ndecision := {\"allow\": true}\n"


def bundle(tmp: Path) -> dict:
    (tmp / "rego").mkdir(exist_ok=True)
    (tmp / "rego" / "p.rego").write_text(POLICY)
    (tmp / "data").mkdir(exist_ok=True)
    return {"auth": {"mode": "none"}, "policy": {"rego": str(tmp / "rego"), "data": str(tmp / "data")},
            "tools": [{"name": "notes", "upstream": "http://127.0.0.1:9"}]}


def serve(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "serve", "-c", str(config)], cwd=config.parent,
                          capture_output=True, text=True, timeout=60)


def assert_one_clean_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "startup error" in ln]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_a_second_regate_in_the_same_directory_says_so(tmp_path):
    cfg = bundle(tmp_path)
    first = RegateProcess(cfg, tmp_path)
    try:
        second = dict(cfg, listen=f"127.0.0.1:{free_port()}",
                      admin={"listen": f"127.0.0.1:{free_port()}"}, audit={"dir": str(tmp_path / "audit")})
        path = tmp_path / "second.yaml"
        path.write_text(yaml.safe_dump(second))
        line = assert_one_clean_line(serve(path))
        assert line.startswith("startup error: audit.dir: another regate is already running"), line
        assert str(tmp_path / "audit") in line
    finally:
        first.stop()


def test_a_port_in_use_names_the_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = dict(bundle(tmp_path), listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{free_port()}"},
                   audit={"dir": str(tmp_path / "audit")})
        path = tmp_path / "regate.yaml"
        path.write_text(yaml.safe_dump(cfg))
        line = assert_one_clean_line(serve(path))
    assert line.startswith(f"startup error: listen: cannot listen on 127.0.0.1:{port}: "), line
    assert "in use" in line


def test_an_admin_port_in_use_names_admin_listen_and_leaves_no_unclosed_session(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = dict(bundle(tmp_path), listen=f"127.0.0.1:{free_port()}", admin={"listen": f"127.0.0.1:{port}"},
                   audit={"dir": str(tmp_path / "audit")})
        path = tmp_path / "regate.yaml"
        path.write_text(yaml.safe_dump(cfg))
        line = assert_one_clean_line(serve(path))
    assert line.startswith(f"startup error: admin.listen: cannot listen on 127.0.0.1:{port}: "), line


def test_an_oserror_that_is_not_listening_is_not_called_cannot_listen():
    # The CLI's last resort for an OSError from start-up: it names the file, not "cannot listen".
    code = ("import sys; from proxy import cli\n"
            "class A: pass\n"
            "def boom(*a, **k): raise FileNotFoundError(2, 'No such file or directory', '/x/overview.html')\n"
            "import proxy.app as app; app.Regate = boom\n"
            "sys.exit(cli._run_worker(None, 0, False))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "startup error: /x/overview.html: No such file or directory"
