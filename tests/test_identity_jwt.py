"""The JWT identity source in process: real keys, real tokens (PyJWT), a real JWKS
server, and injected clocks for everything with time in it (claims, staleness,
the unknown-kid refresh interval)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.config import validate
from proxy.identity import CredentialsError, IdentityError, build_authenticator
from proxy.identity.jwks import max_age_of, parse_jwks
from tests.support.identity import AUDIENCE, ISSUER, JwksServer, SigningKey, jwks

TOOL = {"name": "t", "upstream": "http://127.0.0.1:1"}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def auth_for(tmp_path, keys: list[SigningKey] | None = None, *, jwks_cfg: dict | None = None, issuer: str = ISSUER,
             clock=time.time, monotonic=time.monotonic, **issuer_cfg):
    if jwks_cfg is None:
        f = tmp_path / "jwks.json"
        f.write_text(json.dumps(jwks(*(keys or []))))
        jwks_cfg = {"file": str(f)}
    cfg = validate({"tools": [TOOL], "auth": {"mode": "jwt", "jwt": {"max_token_bytes": 4096, "issuers": [
        {"issuer": issuer, "audiences": [AUDIENCE, "other"], "jwks": jwks_cfg, **issuer_cfg}]}}}, str(tmp_path))
    return build_authenticator(cfg.auth, cfg.path, clock=clock, monotonic=monotonic)


def req(token: str | None = None, *, path: str = "/tools/t/x", headers: list[tuple[str, str]] | None = None):
    h = CIMultiDict(headers or [])
    if token is not None:
        h.add("Authorization", f"Bearer {token}")
    return make_mocked_request("GET", path, headers=h)


async def identify(a, request):
    try:
        return await a.identify(request)
    except IdentityError as exc:
        return exc


def b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------ algorithms


@pytest.mark.parametrize("kind, alg", [
    ("rsa", "RS256"), ("rsa", "RS384"), ("rsa", "RS512"), ("rsa", "PS256"), ("rsa", "PS384"), ("rsa", "PS512"),
    ("p256", "ES256"), ("p384", "ES384"), ("ed25519", "EdDSA"),
])
async def test_every_asymmetric_algorithm_verifies_and_claims_come_through(tmp_path, kind, alg):
    key = SigningKey(kind)
    a = auth_for(tmp_path, [key])
    await a.start()
    agent, claims = await a.identify(req(key.sign({"team": "search"}, alg=alg)))
    assert agent == "coder-7" and claims["team"] == "search" and claims["iss"] == ISSUER
    await a.close()


async def test_a_key_whose_jwk_names_one_alg_verifies_only_that_alg(tmp_path):
    key = SigningKey("rsa")
    key.jwk["alg"] = "PS256"
    a = auth_for(tmp_path, [key])
    await a.start()
    assert (await a.identify(req(key.sign(alg="PS256"))))[0] == "coder-7"
    err = await identify(a, req(key.sign(alg="RS256")))
    assert err.code == "token_algorithm", err.message


async def test_issuer_algorithms_narrow_what_is_accepted(tmp_path):
    key = SigningKey("rsa")
    a = auth_for(tmp_path, [key], algorithms=["PS256"])
    await a.start()
    err = await identify(a, req(key.sign(alg="RS256")))
    assert err.code == "token_algorithm" and "PS256" in err.message


async def test_hmac_signed_with_the_rsa_public_key_is_refused_before_any_verifier(tmp_path):
    key = SigningKey("rsa")
    a = auth_for(tmp_path, [key])
    await a.start()
    # The classic key confusion: HS256 keyed with the PEM of the public key.
    header = b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    payload = b64({"iss": ISSUER, "aud": AUDIENCE, "sub": "coder-7", "exp": int(time.time()) + 300})
    import hashlib
    import hmac

    sig = hmac.new(key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    err = await identify(a, req(forged))
    assert err.code == "token_algorithm" and "HS256" in err.message


def test_a_jwks_never_yields_symmetric_or_private_keys():
    rsa_key = SigningKey("rsa")
    oct_key = {"kty": "oct", "kid": "s", "k": "c2VjcmV0"}
    private = dict(rsa_key.jwk, kid="p", d="AQAB")
    enc = dict(SigningKey("rsa", kid="e").jwk, use="enc")
    ks = parse_jwks({"keys": [oct_key, private, enc, rsa_key.jwk]}, "test")
    assert set(ks.by_kid) == {"k1"}
    assert set(ks.by_kid["k1"]) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    with pytest.raises(CredentialsError, match="no usable signing key"):
        parse_jwks({"keys": [oct_key]}, "test")
    with pytest.raises(CredentialsError, match="not a JWK Set"):
        parse_jwks({"keys": "nope"}, "test")


# ------------------------------------------------------------------ claims, on an injected clock


NOW = 1_800_000_000.0


@pytest.mark.parametrize("claims, code", [
    ({"exp": NOW - 31}, "token_expired"),            # past the 30 s leeway
    ({"exp": NOW - 29}, None),                       # within it
    ({"nbf": NOW + 31}, "token_not_yet_valid"),
    ({"nbf": NOW + 29}, None),
    ({"iat": NOW + 31}, "token_not_yet_valid"),
    ({"iat": NOW + 29}, None),
    ({"exp": None}, "token_claim_missing"),          # exp is required by default
    ({"exp": "tomorrow"}, "token_claims"),
    ({"exp": True}, "token_claims"),
    ({"aud": ["x", "other"]}, None),                 # one of the list is enough
    ({"aud": ["x", "y"]}, "token_audience"),
    ({"aud": None}, "token_audience"),
    ({"iss": "https://evil.test"}, "token_issuer"),
    ({"sub": None}, "token_claim_missing"),
    ({"sub": ""}, "token_claim_missing"),
    ({"sub": 7}, "token_claim_missing"),
])
async def test_claims_table(tmp_path, claims, code):
    key = SigningKey("p256")
    a = auth_for(tmp_path, [key], clock=Clock(NOW))
    await a.start()
    base = {"iat": NOW - 10, "exp": NOW + 300}
    base.update(claims)
    got = await identify(a, req(key.sign(**base)))
    if code is None:
        assert got[0] == "coder-7", got
    else:
        assert isinstance(got, IdentityError) and got.code == code and got.status == 401, got
        assert got.message


async def test_required_claims_and_agent_claim_are_configurable(tmp_path):
    key = SigningKey("rsa")
    a = auth_for(tmp_path, [key], agent_claim="client_id", required_claims=["exp", "jti"])
    await a.start()
    assert (await a.identify(req(key.sign(client_id="bot-1", jti="j1"))))[0] == "bot-1"
    err = await identify(a, req(key.sign(client_id="bot-1")))
    assert err.code == "token_claim_missing" and "jti" in err.message


async def test_a_cached_token_still_expires(tmp_path):
    key = SigningKey("rsa")
    clock = Clock(NOW)
    a = auth_for(tmp_path, [key], clock=clock, leeway_s=0)
    await a.start()
    token = key.sign(iat=NOW, exp=NOW + 60)
    assert (await a.identify(req(token)))[0] == "coder-7"
    clock.t = NOW + 59
    assert (await a.identify(req(token)))[0] == "coder-7"  # from the cache
    clock.t = NOW + 61
    assert (await identify(a, req(token))).code == "token_expired"


# ------------------------------------------------------------------ Kubernetes service-account tokens


def k8s_claims(ns: str = "agents", sa: str = "coder") -> dict:
    return {"iss": "https://kubernetes.default.svc.cluster.local", "aud": [AUDIENCE],
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u-1"},
                              "pod": {"name": "coder-5d9", "uid": "p-1"}}}


async def test_a_projected_service_account_token_is_namespace_slash_name(tmp_path):
    key = SigningKey("rsa")
    a = auth_for(tmp_path, [key], issuer="https://kubernetes.default.svc.cluster.local", kubernetes=True)
    await a.start()
    agent, claims = await a.identify(req(key.sign(k8s_claims())))
    assert agent == "agents/coder" and claims["kubernetes.io"]["pod"]["name"] == "coder-5d9"
    bad = k8s_claims()
    bad["sub"] = "system:serviceaccount:kube-system:admin"
    assert (await identify(a, req(key.sign(bad)))).code == "token_claims"
    no_sa = k8s_claims()
    del no_sa["kubernetes.io"]
    assert (await identify(a, req(key.sign(no_sa)))).code == "token_claim_missing"


# ------------------------------------------------------------------ the JWKS URL: refresh, unknown kid, staleness


async def test_unknown_kid_triggers_one_rate_limited_refresh(tmp_path):
    old, new = SigningKey("rsa", "old"), SigningKey("rsa", "new")
    server = JwksServer(old)
    mono = Clock(1000.0)
    try:
        a = auth_for(tmp_path, jwks_cfg={"url": server.jwks_url, "unknown_kid_interval_s": 30}, monotonic=mono)
        await a.start()
        assert server.fetches == 1
        assert (await a.identify(req(old.sign())))[0] == "coder-7"
        server.serve(old, new)  # the issuer rotates in a new key
        agent, _ = await a.identify(req(new.sign()))
        assert agent == "coder-7" and server.fetches == 2
        # A flood of invented kids: no refresh within the interval, however many.
        errs = await asyncio.gather(*(identify(a, req(new.sign(kid=f"made-up-{i}"))) for i in range(50)))
        assert {e.code for e in errs} == {"token_unknown_kid"} and server.fetches == 2
        mono.t += 31
        err = await identify(a, req(new.sign(kid="made-up")))
        assert err.code == "token_unknown_kid" and server.fetches == 3
        # The old key is retired: tokens it signed stop working with the next fetch, cached or not.
        server.serve(new)
        mono.t += 31
        assert (await identify(a, req(old.sign(kid="gone")))).code == "token_unknown_kid"
        assert (await identify(a, req(old.sign()))).code == "token_unknown_kid"
        await a.close()
    finally:
        server.stop()


@pytest.mark.parametrize("header, expected", [
    ("max-age=120", 120.0), ("public, max-age=5, must-revalidate", 5.0), ("no-cache", 0.0),
    ("no-store, max-age=60", 0.0), (None, None), ("private", None),
])
def test_max_age_of(header, expected):
    assert max_age_of(header) == expected


async def test_outage_cached_keys_until_stale_then_fail_closed_and_recover(tmp_path):
    key = SigningKey("ed25519")
    server = JwksServer(key, max_age=1)
    mono = Clock(0.0)
    try:
        a = auth_for(tmp_path, jwks_cfg={"url": server.jwks_url, "refresh_min_s": 1, "refresh_max_s": 10,
                                         "stale_after_s": 100}, monotonic=mono)
        await a.start()
        source = a.sources[0].verifiers[0].jwks
        token = key.sign()
        server.down = True
        # (time, expected outcome): cached keys until stale_after_s past the last good fetch.
        for t, outcome in ((50.0, "ok"), (99.0, "ok"), (101.0, "identity_unavailable")):
            mono.t = t
            await source.refresh()  # what the background task does; it fails
            got = await identify(a, req(token))
            if outcome == "ok":
                assert got[0] == "coder-7"
                assert a.problems() == [] and "refresh failing" in a.warnings()[0]
            else:
                assert isinstance(got, IdentityError) and got.code == outcome and got.status == 503
                assert got.retry_after
                [problem] = a.problems()
                assert "past stale_after_s 100" in problem and "HTTP 503" in problem
        server.down = False
        await source.refresh()
        assert (await a.identify(req(token)))[0] == "coder-7" and a.problems() == []
        await a.close()
    finally:
        server.stop()


async def test_background_refresh_follows_max_age(tmp_path):
    k1, k2 = SigningKey("rsa", "a"), SigningKey("rsa", "b")
    server = JwksServer(k1, max_age=1)
    try:
        a = auth_for(tmp_path, jwks_cfg={"url": server.jwks_url, "refresh_min_s": 0.2, "refresh_max_s": 60,
                                         "unknown_kid_interval_s": 3600})
        await a.start()
        await a.identify(req(k1.sign()))
        server.serve(k2)
        deadline = time.monotonic() + 5
        while server.fetches < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)
        assert (await a.identify(req(k2.sign())))[0] == "coder-7"
        assert (await identify(a, req(k1.sign()))).code == "token_unknown_kid"
        await a.close()
    finally:
        server.stop()


async def test_oidc_discovery_finds_the_jwks(tmp_path):
    key = SigningKey("p384")
    server = JwksServer(key)
    try:
        a = auth_for(tmp_path, issuer=server.issuer, jwks_cfg={"discovery": True})
        await a.start()
        assert (await a.identify(req(key.sign(iss=server.issuer))))[0] == "coder-7"
        await a.close()
        # Discovery must name the issuer it was asked about.
        server.issuer = "https://someone-else.test"
        b = auth_for(tmp_path, issuer=server.url, jwks_cfg={"discovery": True})
        await b.start()
        assert "names issuer 'https://someone-else.test'" in b.problems()[0]
        assert (await identify(b, req(key.sign(iss=server.url)))).code == "identity_unavailable"
        await b.close()
    finally:
        server.stop()


async def test_jwks_file_reload_is_whole_or_nothing(tmp_path):
    k1, k2 = SigningKey("rsa", "a"), SigningKey("rsa", "b")
    a = auth_for(tmp_path, [k1])
    await a.start()
    f = tmp_path / "jwks.json"
    f.write_text("{not json")
    with pytest.raises(CredentialsError, match="not JSON"):
        a.prepare_reload()
    assert (await a.identify(req(k1.sign())))[0] == "coder-7"  # the old set stays
    f.write_text(json.dumps(jwks(k2)))
    what = a.commit_reload(a.prepare_reload())
    assert what == [f"1 keys from {f}"]
    assert (await identify(a, req(k1.sign()))).code == "token_unknown_kid"
    assert (await a.identify(req(k2.sign())))[0] == "coder-7"


# ------------------------------------------------------------------ transport of the token


async def test_the_header_is_read_strictly(tmp_path):
    key = SigningKey("rsa")
    a = auth_for(tmp_path, [key])
    await a.start()
    t = key.sign()
    cases = {
        "lower-case scheme": ([("Authorization", f"bearer {t}")], "bad_authorization_scheme"),
        "basic": ([("Authorization", "Basic YTpi")], "bad_authorization_scheme"),
        "two headers": ([("Authorization", f"Bearer {t}"), ("Authorization", f"Bearer {t}")],
                        "credentials_ambiguous"),
        "padding": ([("Authorization", f"Bearer {t}==")], "token_malformed"),
        "space inside": ([("Authorization", f"Bearer {t[:10]} {t[10:]}")], "token_malformed"),
        "none": ([], "unauthenticated"),
    }
    for name, (headers, code) in cases.items():
        err = await identify(a, req(headers=headers))
        assert isinstance(err, IdentityError) and err.code == code, (name, err)
    err = await identify(a, req(t, path=f"/tools/t/x?q=1&access_token={t}"))
    assert err.code == "token_in_query"
    # Only the real parameter name counts.
    assert (await a.identify(req(t, path="/tools/t/x?my_access_tokens=1")))[0] == "coder-7"


async def test_a_configured_header_without_scheme(tmp_path):
    key = SigningKey("rsa")
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps(jwks(key)))
    cfg = validate({"tools": [TOOL], "auth": {"mode": "jwt", "jwt": {"header": "X-Agent-Token", "scheme": None,
                    "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"file": str(f)}}]}}})
    a = build_authenticator(cfg.auth, cfg.path)
    await a.start()
    assert (await a.identify(req(headers=[("X-Agent-Token", key.sign())])))[0] == "coder-7"
    assert a.credential_headers == ("X-Agent-Token",)


async def test_sources_in_order_api_key_and_jwt_coexist(tmp_path):
    import hashlib

    key = SigningKey("rsa")
    (tmp_path / "keys.yaml").write_text(
        f"keys:\n  - sha256: {hashlib.sha256(b'k-1').hexdigest()}\n    agent: legacy-bot\n")
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps(jwks(key)))
    cfg = validate({"tools": [TOOL], "auth": {"sources": ["api_key", "jwt"], "keys": "keys.yaml", "jwt": {
        "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"file": str(f)}}]}}}, str(tmp_path))
    a = build_authenticator(cfg.auth, cfg.path)
    await a.start()
    assert (await a.identify(req(headers=[("X-Api-Key", "k-1")])))[0] == "legacy-bot"
    assert (await a.identify(req(key.sign())))[0] == "coder-7"
    # A bad credential is refused, never passed on to the next source.
    err = await identify(a, req(key.sign(aud="x"), headers=[("X-Api-Key", "wrong")]))
    assert err.code == "unauthenticated" and "unknown API key" in err.message
    err = await identify(a, req())
    assert "X-Api-Key" in err.message and "Authorization: Bearer" in err.message
    # A token in the query is refused even when the API key (tried first) is good.
    err = await identify(a, req(headers=[("X-Api-Key", "k-1")], path=f"/tools/t/x?access_token={key.sign()}"))
    assert err.code == "token_in_query"


def test_config_errors_name_the_field():
    from proxy.config import ConfigError

    def problems(auth):
        with pytest.raises(ConfigError) as e:
            validate({"tools": [TOOL], "auth": auth})
        return "\n".join(e.value.problems)

    assert "auth.jwt: required" in problems({"mode": "jwt"})
    assert "exactly one of url, file or discovery" in problems(
        {"mode": "jwt", "jwt": {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks": {}}]}})
    assert "audiences" in problems(
        {"mode": "jwt", "jwt": {"issuers": [{"issuer": ISSUER, "audiences": [], "jwks": {"file": "j"}}]}})
    assert "algorithms[0]: Input should be 'RS256'" in problems(  # no HMAC algorithm can even be configured
        {"mode": "jwt", "jwt": {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks": {"file": "j"},
                                             "algorithms": ["HS256"]}]}})
    assert "tls.client_ca: required" in problems({"mode": "mtls", "mtls": {"trust_domains": ["example.org"]}})
    assert "trust domain" in problems({"mode": "mtls", "mtls": {"trust_domains": ["spiffe://x"]}})
