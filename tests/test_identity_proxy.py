"""Identity end to end: Regate as a process, a JWKS URL served by a test server, a
witness upstream that writes down what reached it, raw sockets for the requests.

A valid JWT is accepted and its claims reach the policy (which puts them in headers
the tool receives); the token reaches neither the tool nor the audit. Fifteen and
more bad tokens each get 401 with a code and a message, and no call reaches the
tool. Keys rotated at the JWKS server are picked up without a restart; a JWKS
outage keeps the cached keys working until the staleness limit, then fails closed
and /readyz says why. keys.yaml reloads on POST /admin/reload and SIGHUP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import AGENT_KEY
from tests.security.conftest import Witness, assert_error, exchange, request
from tests.support.identity import AUDIENCE, JwksServer, SigningKey, claims_policy
from tests.support.procs import ADMIN_HEADERS, RegateProcess

def jwt_config(tmp: Path, witness: Witness, jwks_server: JwksServer, keys_file: Path, **jwks_cfg) -> dict:
    return {
        "auth": {"sources": ["jwt", "api_key"], "keys": str(keys_file), "jwt": {
            "max_token_bytes": 4096,
            "issuers": [{"issuer": jwks_server.issuer, "audiences": [AUDIENCE, "regate-staging"],
                         "jwks": {"url": jwks_server.jwks_url, "refresh_min_s": 0.2, "refresh_max_s": 30,
                                  "unknown_kid_interval_s": 0.2, **jwks_cfg}}]}},
        "policy": claims_policy(tmp),
        "limits": {"enabled": False},
        "tools": [{"name": "search", "upstream": witness.upstream("search"), "timeout_ms": 5000}],
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=b"", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def call(port: int, token: str | None = None, *, key: str | None = None, path: str = "/tools/search/q",
         headers: list[tuple[str, str]] | None = None):
    hdrs = list(headers or [])
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    return exchange(port, request("GET", path, key=key, headers=hdrs)).first


def b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def witness():
    w = Witness()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def idp():
    key = SigningKey("rsa", "k1")
    server = JwksServer(key, max_age=1)
    server.key = key
    yield server
    server.stop()


@pytest.fixture(scope="module")
def regate(witness, idp, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity-proxy")
    proc = RegateProcess(jwt_config(tmp, witness, idp, keys_file), tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


def sign(idp: JwksServer, key: SigningKey | None = None, **claims) -> str:
    return (key or idp.key).sign(claims, iss=idp.issuer)


def test_a_valid_jwt_is_accepted_and_its_claims_reach_the_policy_not_the_token_the_tool(regate, witness, idp):
    before = witness.count()
    token = sign(idp, team="search-team")
    resp = call(regate.port, token)
    assert resp.status == 200, resp.body
    [rec] = witness.records(before)
    got = {k.lower(): v for k, v in rec["headers"]}
    assert got["x-seen-agent"] == "coder-7" and got["x-seen-team"] == "search-team"
    assert got["x-seen-iss"] == idp.issuer
    assert "authorization" not in got  # Regate's credential, not the tool's
    assert "authorization" not in got["x-seen-headers"].split(",")  # nor the policy's
    # The token is in no audit record (a decision's record names the agent).
    time.sleep(0.3)
    audit = b"".join(p.read_bytes() for p in Path(regate.audit_dir).rglob("*") if p.is_file())
    assert resp.decision_id.encode() in audit and token.encode() not in audit
    assert token.split(".")[2].encode() not in audit


def test_api_keys_keep_working_beside_jwts(regate, witness):
    before = witness.count()
    resp = call(regate.port, key=AGENT_KEY)
    assert resp.status == 200
    [rec] = witness.records(before)
    assert {k.lower(): v for k, v in rec["headers"]}["x-seen-team"] == "-"


def bad_tokens(idp: JwksServer) -> dict[str, tuple[dict, str]]:
    """name -> (how it is sent, the code Regate answers with)."""
    key = idp.key
    now = int(time.time())
    other = SigningKey("rsa", "k1")  # same kid, another key: a signature that does not verify
    hs_header = b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    payload = b64({"iss": idp.issuer, "aud": AUDIENCE, "sub": "coder-7", "exp": now + 300})
    hs_sig = hmac.new(key.public_pem(), f"{hs_header}.{payload}".encode(), hashlib.sha256).digest()
    hs = f"{hs_header}.{payload}.{base64.urlsafe_b64encode(hs_sig).rstrip(b'=').decode()}"
    none = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}."
    good = sign(idp)
    bearer = lambda t: {"headers": [("Authorization", f"Bearer {t}")]}  # noqa: E731
    return {
        "expired": (bearer(sign(idp, exp=now - 120, iat=now - 600)), "token_expired"),
        "not_yet_valid": (bearer(sign(idp, nbf=now + 600)), "token_not_yet_valid"),
        "issued_in_the_future": (bearer(sign(idp, iat=now + 600)), "token_not_yet_valid"),
        "wrong_issuer": (bearer(key.sign(iss="https://evil.test")), "token_issuer"),
        "wrong_audience": (bearer(sign(idp, aud="someone-else")), "token_audience"),
        "bad_signature": (bearer(sign(idp, other)), "token_signature"),
        "tampered_payload": (bearer(".".join([good.split(".")[0], b64({"iss": idp.issuer, "aud": AUDIENCE,
                             "sub": "admin", "exp": now + 300}), good.split(".")[2]])), "token_signature"),
        "unknown_kid": (bearer(key.sign(iss=idp.issuer, kid="nobody")), "token_unknown_kid"),
        "alg_none": (bearer(none), "token_algorithm"),
        "hs256_with_the_rsa_public_key": (bearer(hs), "token_algorithm"),
        "jku_elsewhere": (bearer(key.sign(iss=idp.issuer, headers={"jku": "https://evil.test/jwks"})),
                          "token_header"),
        "embedded_jwk": (bearer(key.sign(iss=idp.issuer, headers={"jwk": other.jwk})), "token_header"),
        "x5u_elsewhere": (bearer(key.sign(iss=idp.issuer, headers={"x5u": "https://evil.test/cert"})),
                          "token_header"),
        "missing_sub": (bearer(sign(idp, sub=None)), "token_claim_missing"),
        "malformed_base64": (bearer("eyJhbGciOiJSUzI1NiJ9!.e30.c2ln"), "token_malformed"),
        "not_json_header": (bearer(f"{base64.urlsafe_b64encode(b'nope').rstrip(b'=').decode()}.e30.c2ln"),
                            "token_malformed"),
        "oversized": (bearer(sign(idp, pad="x" * 5000)), "token_too_large"),
        "two_authorization_headers": ({"headers": [("Authorization", f"Bearer {good}"),
                                                   ("Authorization", f"Bearer {good}")]}, "credentials_ambiguous"),
        "token_in_query_string": ({"path": f"/tools/search/q?access_token={good}"}, "token_in_query"),
        "token_in_query_beside_the_header": ({"path": f"/tools/search/q?access_token={good}", **bearer(good)},
                                             "token_in_query"),
        "lower_case_bearer": ({"headers": [("Authorization", f"bearer {good}")]}, "bad_authorization_scheme"),
        "no_credentials_at_all": ({}, "unauthenticated"),
    }


def test_bad_tokens_each_get_401_with_a_code_and_nothing_reaches_the_tool(regate, witness, idp):
    cases = bad_tokens(idp)
    assert len(cases) >= 15
    before = witness.count()
    for name, (how, code) in cases.items():
        resp = call(regate.port, key=None, **how)
        err = assert_error(resp, 401, code)
        assert len(err["message"]) > 20, (name, err)
        assert (resp.header("WWW-Authenticate") or "").startswith("Bearer realm=\"regate\""), (name, resp.headers)
    assert witness.count() == before, witness.records(before)
    # Still serving afterwards.
    assert call(regate.port, sign(idp)).status == 200


def test_key_rotation_at_the_jwks_server_is_picked_up_without_restart(regate, idp):
    old = idp.key
    new = SigningKey("p256", "k2")
    try:
        idp.serve(old, new)  # a new key appears: its first token triggers a refresh
        time.sleep(0.25)  # past unknown_kid_interval_s, which the bad-token table may have used
        resp = call(regate.port, sign(idp, new))
        assert resp.status == 200, resp.body
        idp.serve(new)  # the old key is retired: the background refresh (max-age 1 s) drops it
        old_token = sign(idp, old)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            resp = call(regate.port, old_token)
            if resp.status == 401:
                break
            time.sleep(0.1)
        assert_error(resp, 401, "token_unknown_kid")
        assert call(regate.port, sign(idp, new)).status == 200
    finally:
        idp.serve(old)
        deadline = time.monotonic() + 5
        while call(regate.port, sign(idp, old)).status != 200 and time.monotonic() < deadline:
            time.sleep(0.1)


def test_jwks_outage_cached_keys_until_stale_then_fail_closed_and_readyz_says_why(witness, keys_file, tmp_path):
    key = SigningKey("ed25519", "e1")
    idp = JwksServer(key, max_age=1)
    proc = RegateProcess(jwt_config(tmp_path, witness, idp, keys_file, stale_after_s=3.0), tmp_path)
    try:
        token = key.sign(iss=idp.issuer)
        assert call(proc.port, token).status == 200
        idp.down = True
        down_at = time.monotonic()
        # Cached keys keep working; once a refresh has failed readiness warns but stays ready.
        while time.monotonic() - down_at < 1.5:
            assert call(proc.port, token).status == 200
            status, ready = get_json(proc.admin_url + "/readyz")
            assert status == 200 and ready["ready"], ready
            if ready["warnings"]:
                break
            time.sleep(0.1)
        assert any("refresh failing" in w for w in ready["warnings"]), ready
        assert call(proc.port, token).status == 200
        # Past stale_after_s: fail closed, 503 with Retry-After, and /readyz names the cause.
        while time.monotonic() - down_at < 4.5:
            time.sleep(0.2)
        before = witness.count()
        resp = call(proc.port, token)
        err = assert_error(resp, 503, "identity_unavailable")
        assert resp.header("Retry-After") and "stale_after_s" in err["message"]
        assert witness.count() == before
        status, ready = get_json(proc.admin_url + "/readyz")
        assert status == 503 and not ready["ready"]
        assert any("stale_after_s 3" in p and "HTTP 503" in p and idp.jwks_url in p for p in ready["problems"]), ready
        # API keys do not depend on the issuer.
        assert call(proc.port, key=AGENT_KEY).status == 200
        # The issuer comes back: so do its tokens, and readiness.
        idp.down = False
        deadline = time.monotonic() + 5
        while call(proc.port, token).status != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert call(proc.port, token).status == 200
        assert get_json(proc.admin_url + "/readyz")[0] == 200
    finally:
        proc.stop()
        idp.stop()


# ------------------------------------------------------------------ keys.yaml reload


def keys_yaml(path: Path, entries: dict[str, str]) -> None:
    lines = ["keys:"]
    for key, agent in entries.items():
        lines += [f"  - sha256: {hashlib.sha256(key.encode()).hexdigest()}", f"    agent: {agent}"]
    path.write_text("\n".join(lines) + "\n")


def test_keys_yaml_reload_adds_and_removes_keys_at_once_and_keeps_the_old_set_on_error(witness, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys_yaml(keys, {"key-old": "coder-7"})
    cfg = {"auth": {"mode": "api_key", "keys": str(keys)}, "policy": claims_policy(tmp_path),
           "limits": {"enabled": False},
           "tools": [{"name": "search", "upstream": witness.upstream("search")}]}
    proc = RegateProcess(cfg, tmp_path)
    try:
        assert call(proc.port, key="key-old").status == 200
        assert_error(call(proc.port, key="key-new"), 401, "unauthenticated")
        keys_yaml(keys, {"key-new": "analyst-2"})
        status, body = post_json(proc.admin_url + "/admin/reload", ADMIN_HEADERS)
        assert status == 200 and body["reloaded"], body
        assert body["credentials"] == {"reloaded": True, "what": [f"1 API keys from {keys}"]}
        assert body["policy"]["reloaded"] and body["revision"] == body["policy"]["revision"]
        # Right after the reload: the new key works, the removed one is refused.
        assert call(proc.port, key="key-new").status == 200
        assert_error(call(proc.port, key="key-old"), 401, "unauthenticated")

        # A broken file: 422 naming it; the set in use stays.
        keys.write_text("keys:\n  - sha256: not-hex\n    agent: x\n")
        status, body = post_json(proc.admin_url + "/admin/reload", ADMIN_HEADERS)
        assert status == 422 and not body["reloaded"] and not body["credentials"]["reloaded"]
        assert str(keys) in body["error"]["message"] and "sha256" in body["error"]["message"]
        assert body["policy"]["reloaded"]  # the policy is its own part
        assert call(proc.port, key="key-new").status == 200

        # SIGHUP reloads the same way.
        keys_yaml(keys, {"key-old": "coder-7"})
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while call(proc.port, key="key-old").status != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(proc.port, key="key-old").status == 200
        assert_error(call(proc.port, key="key-new"), 401, "unauthenticated")
    finally:
        proc.stop()


def test_a_custom_token_header_reaches_neither_the_policy_nor_the_tool(witness, tmp_path):
    key = SigningKey("p256", "c1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [key.jwk]}))
    cfg = {"auth": {"mode": "jwt", "jwt": {"header": "X-Agent-Token", "scheme": None, "issuers": [
               {"issuer": "https://idp.regate.test", "audiences": [AUDIENCE], "jwks": {"file": "jwks.json"}}]}},
           "policy": claims_policy(tmp_path), "limits": {"enabled": False},
           "tools": [{"name": "search", "upstream": witness.upstream("search")}]}
    proc = RegateProcess(cfg, tmp_path)
    try:
        before = witness.count()
        resp = call(proc.port, headers=[("X-Agent-Token", key.sign())])
        assert resp.status == 200, resp.body
        [rec] = witness.records(before)
        got = {k.lower(): v for k, v in rec["headers"]}
        assert got["x-seen-agent"] == "coder-7"
        assert "x-agent-token" not in got and "x-agent-token" not in got["x-seen-headers"].split(",")
        assert "host" in got["x-seen-headers"].split(",")  # the policy does see headers
    finally:
        proc.stop()
