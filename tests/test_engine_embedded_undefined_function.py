"""A call to a function that does not exist (a typo such as `sprintff`) is reported as
undefined, with the likely name; `policy.engine: opa` is suggested only for a real
OPA builtin regorus lacks (issue 23). Through the real `regate config check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.engines.embedded import OPA_BUILTINS, OPA_ONLY_BUILTINS, regorus_has_builtin


def check(tmp: Path, body: str) -> list[str]:
    (tmp / "rego").mkdir()
    (tmp / "rego" / "notes.rego").write_text(f"package regate\nimport rego.v1\n{body}\n")
    (tmp / "policies").mkdir()
    (tmp / "regate.yaml").write_text("auth: {mode: none}\ntools: [{name: notes, upstream: 'http://127.0.0.1:9'}]\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "config", "check", "-c", "regate.yaml"], cwd=tmp,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    return r.stderr.splitlines()


def test_a_typo_is_undefined_and_names_the_builtin_meant(tmp_path):
    lines = check(tmp_path, 'decision := {"allow": true, "reasons": [sprintff("%s", ["x"])]}')
    assert len(lines) == 1, lines
    assert "rego/notes.rego:3:" in lines[0]
    assert "sprintff is undefined" in lines[0] and "did you mean sprintf?" in lines[0]
    assert "engine: opa" not in lines[0] and "regorus" not in lines[0] and "tokens" not in lines[0]


def test_a_name_like_nothing_gets_no_suggestion(tmp_path):
    (line,) = check(tmp_path, 'decision := {"allow": frobnicate_widgets(1)}')
    assert "frobnicate_widgets is undefined" in line and "did you mean" not in line and "opa" not in line


def test_an_opa_builtin_regorus_lacks_points_at_the_opa_engine(tmp_path):
    (line,) = check(tmp_path, 'decision := {"allow": count(net.cidr_merge(["10.0.0.0/8"])) > 0}')
    assert "net.cidr_merge is not available in the embedded engine (regorus)" in line
    assert "policy.engine: opa" in line and "tokens" not in line  # the identify-stage hint is for io.jwt.*


def test_a_jwt_builtin_also_says_where_tokens_are_verified(tmp_path):
    (line,) = check(tmp_path, 'decision := {"allow": io.jwt.decode(input.t)[0] == {}}')
    assert "io.jwt.decode is not available" in line and "identify stage" in line and "policy.engine: opa" in line


@pytest.mark.parametrize("name", sorted(OPA_ONLY_BUILTINS))
def test_the_opa_only_list_matches_what_regorus_lacks(name):
    # If regorus gains one, it leaves the list (and the README's list of differences).
    assert name in OPA_BUILTINS
    assert not regorus_has_builtin(name, 1) or not regorus_has_builtin(name, 2)
