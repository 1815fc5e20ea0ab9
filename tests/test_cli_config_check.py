"""`regate config check` as a newcomer runs it (issue 23), through the real CLI: the
policy revision is the compiled bundle's (read before the engine closes), every
file-level problem is reported in one run, and `listen: 8080` (a YAML number)
gets a message saying what to write instead of pydantic's text."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT

POLICY = "package regate\nimport rego.v1\ndefault decision := {\"allow\": false}\n"


def regate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def write(tmp: Path, *, listen: str = "127.0.0.1:8080", keys: bool = True, rego: bool = True) -> Path:
    (tmp / "regate.yaml").write_text(f"""listen: {listen}
auth: {{mode: api_key, keys: keys.yaml}}
tools:
  - name: notes
    upstream: http://127.0.0.1:9001
""")
    if keys:
        digest = hashlib.sha256(b"k").hexdigest()
        (tmp / "keys.yaml").write_text(f"keys:\n  - sha256: {digest}\n    agent: alice\n")
    if rego:
        (tmp / "rego").mkdir()
        (tmp / "rego" / "p.rego").write_text(POLICY)
    (tmp / "policies").mkdir()
    return tmp / "regate.yaml"


def test_a_valid_config_prints_the_compiled_revision(tmp_path):
    write(tmp_path)
    r = regate("config", "check", "-c", "regate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith("config OK: 1 tools, engine embedded, policy revision sha256:"), line
    assert "unloaded" not in r.stdout + r.stderr


def test_every_missing_file_is_reported_in_one_run(tmp_path):
    write(tmp_path, keys=False, rego=False)
    r = regate("config", "check", "-c", "regate.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("config error: auth.keys: cannot read ") and "keys.yaml" in lines[0]
    assert lines[1].startswith("config error: ") and "rego" in lines[1] and "does not exist" in lines[1]
    assert "Traceback" not in r.stderr


def test_listen_as_a_number_says_what_to_write(tmp_path):
    write(tmp_path, listen="8080")
    r = regate("config", "check", "-c", "regate.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        'config error: listen: listen must be HOST:PORT as a string, e.g. "127.0.0.1:8080"; got 8080']
    assert "valid string" not in r.stderr
