"""OPA's data layout (proxy/engines/bundle.py): data mounted exactly as the real OPA mounts it.

Each case is a directory the test writes, loaded by Regate and by ``opa eval``
(``opa eval -d <dir> data``, as ``opa run rego/ policies/`` loads it, and ``-b``,
as a bundle): the data documents must be identical, or both must refuse the
files. OPA is the real binary (tests/support/opa_server.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.engines.bundle import BundleError, load_bundle
from proxy.engines.embedded import EmbeddedEngine
from tests.support.opa_server import ROOT, opa_binary, shipped_paths

POLICY = 'package t\n\nr := 1\n'


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def opa_data(*args: str) -> tuple[bool, object]:
    """(loaded, data or the error text) from ``opa eval <args> data``, rules left out."""
    done = subprocess.run([opa_binary(), "eval", *args, "-f", "json", "data"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    out = json.loads(done.stdout or "{}")
    if "result" not in out:
        return False, done.stdout + done.stderr
    data = out["result"][0]["expressions"][0]["value"]
    data.pop("t", None)  # the rule of POLICY
    return True, data


def regate_data(rego: Path, data: Path) -> tuple[bool, object]:
    try:
        bundle = load_bundle(rego, data)
    except BundleError as exc:
        return False, str(exc)
    return True, bundle.data


def test_the_shipped_bundle_mounts_as_opa_mounts_it():
    # The data directory alone (with rego/ OPA's `data` would hold the rules' values too).
    ok, theirs = opa_data("-d", shipped_paths()[1])
    assert ok, theirs
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    assert bundle.data == theirs
    assert set(bundle.data) == {"agents", "tools", "limits"}
    assert "coder-7" in bundle.data["agents"] and "shell" in bundle.data["tools"]


CASES = {
    "nested_directories": {"a/b/data.json": '{"c": 1}', "a/data.yaml": "d: 2\n", "x/data.yml": "[1, 2]\n"},
    "root_data_json_merges_with_a_directory": {"data.json": '{"agents": {"x": 1}, "top": true}',
                                               "agents/data.yaml": "y: 2\n"},
    "deep_merge_of_objects": {"data.json": '{"a": {"b": {"c": 1}}}', "a/b/data.json": '{"d": 2}'},
    "empty_file_is_null": {"agents/data.yaml": "", "tools/data.yaml": "# only a comment\n"},
    "yaml_scalars_as_go_yaml_reads_them": {"s/data.yaml": (
        "a: yes\nb: on\nc: y\nd: True\ne: 1e3\nf: 0x1F\ng: 017\nh: 0o17\ni: 1_000\nj: 2024-01-01\n"
        "k: 2024-01-01 10:00:00\nl: 1:30\nm: 1.0\nn: .5\no: -0\np: ~\nq: 12345678901234567890\n"
        "r: 99999999999999999999\ns: 08\nt: 1.5e-7\n1: int key\ntrue: bool key\n1.5: float key\n"
        "1e7: float key 2\nu: [NO, Off, FALSE]\nv: !!float 3\n")},
    "json_big_numbers_and_unicode": {"j/data.json": '{"big": 12345678901234567890, '
                                                    '"f": 1.5e-7, "u": "ünï\\u00a0", "e": 1E2}'},
}
CONFLICTS = {
    "scalar_set_twice": {"data.json": '{"agents": {"x": 1}}', "agents/data.yaml": "x: 2\n"},
    "object_against_array": {"data.json": '{"a": [1]}', "a/data.json": '{"b": 1}'},
    "root_is_not_an_object": {"data.json": "[1, 2]"},
    "same_value_twice_is_still_a_conflict": {"data.json": '{"a": {"b": 1}}', "a/data.json": '{"b": 1}'},
    "two_files_in_one_directory": {"a/data.json": '{"b": 1}', "a/data.yaml": "b: 1\n"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_files_mount_and_merge_as_in_opa(name, tmp_path):
    data = write(tmp_path / "policies", CASES[name])
    rego = write(tmp_path / "rego", {"t.rego": POLICY})
    ok, ours = regate_data(rego, data)
    assert ok, ours
    for args in (["-d", str(rego), "-d", str(data)], ["-b", str(data)]):
        ok, theirs = opa_data(*args)
        assert ok, theirs
        assert ours == theirs, args


@pytest.mark.parametrize("name", sorted(CONFLICTS))
def test_conflicting_data_is_refused_as_in_opa_naming_both_files(name, tmp_path):
    data = write(tmp_path / "policies", CONFLICTS[name])
    rego = write(tmp_path / "rego", {"t.rego": POLICY})
    ok, ours = regate_data(rego, data)
    assert not ok, ours
    ok, theirs = opa_data("-b", str(data))
    assert not ok, theirs
    if name == "root_is_not_an_object":
        assert "must hold an object" in ours
    else:
        first, second = sorted(CONFLICTS[name])
        assert ours.startswith(f"{data / second}: data.") and f"is already set by {data / first}" in ours, ours


def test_an_old_style_data_file_is_refused_with_where_to_move_it(tmp_path):
    data = write(tmp_path / "policies", {"agents.yaml": "a: 1\n", "x/y.json": "{}", "ok/data.yaml": "b: 2\n"})
    rego = write(tmp_path / "rego", {"t.rego": POLICY})
    with pytest.raises(BundleError) as err:
        load_bundle(rego, data)
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{data}/agents.yaml: data is mounted as OPA mounts it")
    assert f"move it to {data}/agents/data.yaml (`git mv {data}/agents.yaml {data}/agents/data.yaml`)" in problems[0]
    assert "to keep it at data.agents" in problems[0] and "upgrade notes" in problems[0]
    assert f"move it to {data}/x/y/data.json" in problems[1] and "data.x.y" in problems[1]
    # The engine refuses the bundle the same way at start and on reload.
    engine = EmbeddedEngine(rego, data)
    with pytest.raises(BundleError, match="agents.yaml: data is mounted as OPA mounts it"):
        engine.load()


def test_an_old_style_checkout_cannot_start_regate(tmp_path):
    """`regate config check` on the pre-move layout names the file and the git mv."""
    data = tmp_path / "policies"
    data.mkdir()
    for name in ("agents", "tools", "limits"):
        (data / f"{name}.yaml").write_text((ROOT / "policies" / name / "data.yaml").read_text())
    cfg = tmp_path / "regate.yaml"
    cfg.write_text(yaml.safe_dump({"tools": [{"name": "search", "upstream": "http://127.0.0.1:9"}],
                                   "policy": {"rego": str(ROOT / "rego"), "data": str(data)},
                                   "audit": {"enabled": False}}))
    done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "proxy", "config", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    for name in ("agents", "tools", "limits"):
        assert f"git mv {data}/{name}.yaml {data}/{name}/data.yaml" in done.stderr, done.stderr


def test_revision_is_a_content_hash_of_what_decides(tmp_path):
    rego = write(tmp_path / "rego", {"t.rego": POLICY, "t_test.rego": "package t_test\ntest_x if true\n"})
    data = write(tmp_path / "policies", {"a/data.yaml": "b: 1\n", "README.md": "not data\n"})
    first = load_bundle(rego, data).revision
    (data / "NOTES.txt").write_text("not part of the bundle either")
    (rego / "t_test.rego").write_text("package t_test\ntest_y if true\n")
    assert load_bundle(rego, data).revision == first
    (data / "a" / "data.yaml").write_text("b: 2\n")
    assert load_bundle(rego, data).revision != first
