"""Bundles made by the real ``opa build``: tarballs, manifests and signatures.

Every bundle here is built by the real OPA (tests/support/opa_server.py,
``build_bundle``), signed with keys this test makes (cryptography), and loaded
by Regate as ``policy.bundle`` loads it. Tampering is done by repacking the
tarball, as an attacker with write access to the bundle store would.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.engines.bundle import BundleError, SigningKey, load_bundle, load_bundle_file
from proxy.engines.embedded import EmbeddedEngine
from tests.conftest import AGENT_KEY
from tests.support.opa_server import ROOT, build_bundle, opa_binary, shipped_paths
from tests.support.procs import ADMIN_HEADERS, RegateProcess

SHELL_LS = {"version": 1, "agent": {"id": "coder-7", "claims": {}},
            "tool": {"name": "shell", "route": "/tools/shell", "gpu": None},
            "request": {"method": "POST", "path": "/tools/shell/run", "query": {}, "headers": {},
                        "body": {"command": "ls -la"}, "arguments": {"command": "ls -la"}},
            "mcp": None, "state": {}}
SHELL_RM = {**SHELL_LS, "request": {**SHELL_LS["request"], "arguments": {"command": "rm -rf /"}}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Per algorithm: (the private key file opa build signs with, the key Regate verifies with)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for alg, key in (("RS256", rsa.generate_private_key(65537, 2048)), ("ES256", ec.generate_private_key(ec.SECP256R1()))):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        (d / f"{alg}.pem").write_bytes(pem)
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (d / f"{alg}.pub").write_bytes(pub)
        out[alg] = (d / f"{alg}.pem", pub.decode())
    out["HS256"] = ("a shared secret for HS256 bundles", "a shared secret for HS256 bundles")  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory) -> Path:
    return build_bundle(shipped_paths(), tmp_path_factory.mktemp("signed") / "bundle.tar.gz", "rev-signed",
                        signing_key=keys["RS256"][0])


def rsa_key(keys) -> SigningKey:
    return SigningKey(keys["RS256"][1], "RS256")


def members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def repack(files: dict[str, bytes], out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out


def test_an_opa_build_tarball_loads_with_its_manifest_revision(tmp_path):
    tarball = build_bundle(shipped_paths(), tmp_path / "bundle.tar.gz", "rev-42")
    bundle = load_bundle_file(tarball)
    directory = load_bundle(ROOT / "rego", ROOT / "policies")
    assert bundle.revision == "rev-42" and bundle.manifest["rego_version"] == 1 and bundle.roots == [""]
    assert bundle.data == directory.data
    assert sorted(m.name.split("/rego/", 1)[1] for m in bundle.modules) == \
        sorted(m.name.split("rego/", 1)[1] for m in directory.modules)
    engine = EmbeddedEngine.from_bundle(bundle)
    assert engine.revision == "rev-42"
    assert engine.compiled.decide(SHELL_LS).allow is True
    assert engine.compiled.decide(SHELL_RM).allow is False
    # Without --revision the manifest has none: the revision is the content hash.
    plain = load_bundle_file(build_bundle(shipped_paths(), tmp_path / "plain.tar.gz", None))
    assert plain.revision.startswith("sha256:") and plain.revision == plain.digest


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_a_signed_bundle_loads_with_the_configured_key(alg, keys, tmp_path):
    private, public = keys[alg]
    tarball = build_bundle(shipped_paths(), tmp_path / "b.tar.gz", f"rev-{alg}", signing_key=private,
                           signing_alg=alg)
    assert ".signatures.json" in {Path(n).name for n in members(tarball)}
    bundle = load_bundle_file(tarball, signing=SigningKey(public, alg))
    assert bundle.revision == f"rev-{alg}"
    assert EmbeddedEngine.from_bundle(bundle).compiled.decide(SHELL_LS).allow is True


def test_a_tampered_file_is_refused_naming_it(signed, keys, tmp_path):
    files = members(signed)
    name = next(n for n in files if n.endswith("/rego/tools/shell.rego"))
    files[name] = files[name].replace(b"not allowed", b"false")  # a rule loosened by someone
    bad = repack(files, tmp_path / "tampered.tar.gz")
    with pytest.raises(BundleError) as err:
        load_bundle_file(bad, signing=rsa_key(keys))
    [problem] = err.value.problems  # one file changed: one problem, naming it
    assert problem.startswith(f"{bad}/rego/tools/shell.rego: digest mismatch: the file is not the one the "
                              "bundle signature signs (want "), problem
    assert problem.endswith("); refused")


def test_added_removed_and_unsigned_files_are_refused(signed, keys, tmp_path):
    files = members(signed)
    added = repack({**files, "/rego/extra.rego": b"package regate\n\nallow_all := true\n"}, tmp_path / "a.tar.gz")
    with pytest.raises(BundleError, match=r"a\.tar\.gz/rego/extra\.rego: not included in the bundle signature"):
        load_bundle_file(added, signing=rsa_key(keys))
    gone = next(n for n in files if n.endswith("/rego/tools/payments.rego"))
    removed = repack({n: b for n, b in files.items() if n != gone}, tmp_path / "r.tar.gz")
    with pytest.raises(BundleError, match=r"r\.tar\.gz/rego/tools/payments\.rego: listed in the bundle signature "
                                          r"but not found"):
        load_bundle_file(removed, signing=rsa_key(keys))
    unsigned = repack({n: b for n, b in files.items() if not n.endswith(".signatures.json")}, tmp_path / "u.tar.gz")
    with pytest.raises(BundleError, match=r"u\.tar\.gz: the bundle has no \.signatures\.json"):
        load_bundle_file(unsigned, signing=rsa_key(keys))
    with pytest.raises(BundleError, match=r"the bundle is signed \(\.signatures\.json\) but no key"):
        load_bundle_file(signed)
    other = SigningKey(keys["ES256"][1], "ES256")
    with pytest.raises(BundleError, match=r"\.signatures\.json: the signature does not verify"):
        load_bundle_file(signed, signing=other)
    wrong = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(BundleError, match=r"\.signatures\.json: the signature does not verify"):
        load_bundle_file(signed, signing=SigningKey(wrong, "RS256"))


def test_structured_files_are_hashed_by_their_json_value(keys, tmp_path):
    """As OPA: data.json's signature covers its value, not its bytes (a reformatted
    file verifies; a changed value does not), here with strings Go escapes its own way."""
    src = tmp_path / "src"
    (src / "odd").mkdir(parents=True)
    (src / "p.rego").write_text("package p\n\nx := data.odd\n")
    value = {"z": "\b\f\n\t\u2028\u2029<>&é\x01\x7f", "a": [1.5e-07, 1e21, 12345678901234567890, -0.0, 0.1],
             "m": {"b": None, "a": True}, "e": "🙂"}
    (src / "odd" / "data.json").write_text(json.dumps(value))
    tarball = build_bundle([str(src)], tmp_path / "odd.tar.gz", "r1", signing_key=keys["RS256"][0])
    assert load_bundle_file(tarball, signing=rsa_key(keys)).data["odd"]["z"] == value["z"]
    files = members(tarball)
    data_name = next(n for n in files if n.endswith("data.json"))
    doc = json.loads(files[data_name])
    files[data_name] = json.dumps(doc, indent=4, sort_keys=False, ensure_ascii=True).encode()
    load_bundle_file(repack(files, tmp_path / "reformatted.tar.gz"), signing=rsa_key(keys))
    doc["odd"]["m"]["a"] = False
    files[data_name] = json.dumps(doc).encode()
    with pytest.raises(BundleError, match=r"changed\.tar\.gz/data\.json: digest mismatch"):
        load_bundle_file(repack(files, tmp_path / "changed.tar.gz"), signing=rsa_key(keys))


def test_the_signature_scope_must_match(keys, tmp_path):
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"scope": "write"}))
    tarball = build_bundle(shipped_paths(), tmp_path / "s.tar.gz", "rev-s", signing_key=keys["RS256"][0],
                           sign_args=("--claims-file", str(claims)))
    with pytest.raises(BundleError, match="scope mismatch"):
        load_bundle_file(tarball, signing=rsa_key(keys))
    assert load_bundle_file(tarball, signing=SigningKey(keys["RS256"][1], "RS256", "write")).revision == "rev-s"


def test_manifest_roots_are_enforced_as_opa_enforces_them(tmp_path):
    files = members(build_bundle(shipped_paths(), tmp_path / "b.tar.gz", "rev-r"))
    manifest = json.loads(files["/.manifest"])
    for roots, problem in ((["regate"], "do not permit data at path '/agents'"),
                           (["agents", "limits", "tools"], "do not permit package regate"),
                           (["regate", "regate/tools", "agents"], "overlapped roots")):
        files["/.manifest"] = json.dumps({**manifest, "roots": roots}).encode()
        bad = repack(files, tmp_path / "roots.tar.gz")
        with pytest.raises(BundleError, match=problem):
            EmbeddedEngine.from_bundle(load_bundle_file(bad))
        done = subprocess.run([opa_binary(), "eval", "-b", str(bad), "data.regate.decision"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0 and ("roots" in done.stdout + done.stderr), done.stdout  # OPA refuses it too
    files["/.manifest"] = json.dumps({**manifest, "roots": ["regate", "agents", "limits", "tools"]}).encode()
    ok = load_bundle_file(repack(files, tmp_path / "ok.tar.gz"))
    assert ok.roots == ["regate", "agents", "limits", "tools"]
    EmbeddedEngine.from_bundle(ok)


def test_policy_test_runs_a_tarballs_tests(tmp_path):
    from proxy.policytool import run_policy_tests

    out, err = io.StringIO(), io.StringIO()
    tarball = build_bundle(shipped_paths(), tmp_path / "b.tar.gz", "rev-t")
    assert run_policy_tests(tarball, None, out=out, err=err) == 0, out.getvalue() + err.getvalue()
    assert "data.regate_test.test_shell_refuses_recursive_delete: PASS" in out.getvalue()


def bundle_config(upstream: str, keys_file: Path, bundle: dict) -> dict:
    return {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"bundle": bundle},
        "tools": [{"name": n, "upstream": upstream, "timeout_ms": 5000} for n in ("search", "shell", "payments")],
    }


async def test_regate_serves_a_signed_bundle_and_refuses_a_tampered_one(signed, keys, upstream, keys_file,
                                                                        tmp_path):
    pub = tmp_path / "bundle.pub"
    pub.write_text(keys["RS256"][1])
    key = {"public_key": str(pub), "algorithm": "RS256"}
    (tmp_path / "ok").mkdir()
    proc = RegateProcess(bundle_config(upstream, keys_file, {"path": str(signed), "signing_key": key}),
                         tmp_path / "ok")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.url + "/tools/shell/run", json={"command": "ls -la"},
                              headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["X-Regate-Policy-Revision"] == "rev-signed"
            async with s.post(proc.url + "/tools/shell/run", json={"command": "rm -rf /"},
                              headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 403 and r.headers["X-Regate-Policy-Revision"] == "rev-signed"
            async with s.get(proc.admin_url + "/admin/status", headers=ADMIN_HEADERS) as r:
                assert (await r.json())["policy"]["revision"] == "rev-signed"
    finally:
        proc.stop()
    files = members(signed)
    name = next(n for n in files if n.endswith("/rego/regate.rego"))
    files[name] += b"\n# tampered\n"
    bad = repack(files, tmp_path / "bad.tar.gz")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bundle_config(upstream, keys_file, {"path": str(bad), "signing_key": key})))
    done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "proxy", "config", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert f"{bad}/rego/regate.rego: digest mismatch" in done.stderr, done.stderr
