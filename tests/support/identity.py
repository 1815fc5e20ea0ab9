"""Real key material for the identity tests: signing keys and their JWKs, tokens
signed with PyJWT, a CA that issues server and client (SPIFFE) certificates, and a
JWKS server (aiohttp, in a thread of its own) whose keys, max-age and health a
test changes while Regate runs."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.regate.test"
AUDIENCE = "regate"


# ------------------------------------------------------------------ signing keys


class SigningKey:
    """A private key, its kid and the public JWK a JWKS publishes."""

    def __init__(self, kind: str = "rsa", kid: str = "k1") -> None:
        self.kind, self.kid = kind, kid
        if kind == "rsa":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind in ("p256", "p384"):
            self.private = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
            self.jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind == "ed25519":
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            raise ValueError(kind)
        self.jwk["kid"] = kid
        self.jwk["use"] = "sig"

    @property
    def default_alg(self) -> str:
        return {"rsa": "RS256", "p256": "ES256", "p384": "ES384", "ed25519": "EdDSA"}[self.kind]

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: dict[str, Any] | None = None, *, alg: str | None = None, headers: dict | None = None,
             kid: str | None | bool = True, **overrides: Any) -> str:
        """A token with sensible claims (iss, aud, sub, iat, exp), `overrides` applied
        (a value of None removes the claim)."""
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "coder-7", "iat": now, "exp": now + 300}
        body.update(claims or {})
        for k, v in overrides.items():
            body[k] = v
        body = {k: v for k, v in body.items() if v is not None}
        hdr = dict(headers or {})
        if kid is True:
            hdr["kid"] = self.kid
        elif isinstance(kid, str):
            hdr["kid"] = kid
        return jwt.encode(body, self.private, algorithm=alg or self.default_alg, headers=hdr)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk for k in keys]}


# ------------------------------------------------------------------ certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A certificate authority that writes its certificates as PEM files under `directory`."""

    def __init__(self, directory: Path, name: str = "Regate Test CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=1)).not_valid_after(_now() + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        slug = name.lower().replace(" ", "-")
        self.path = self.dir / f"{slug}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, *, cn: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), client: bool = False, server: bool = False,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> tuple[Path, Path]:
        """A leaf certificate and key, written to <stem>.crt / <stem>.key; returns the two paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
            .not_valid_after(not_after or _now() + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        crt, kp = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(_pem_key(key))
        return crt, kp

    def server(self, stem: str = "server") -> tuple[Path, Path]:
        return self.issue(stem, cn="localhost", dns=("localhost",), ips=("127.0.0.1",), server=True)


def peer_cn(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# ------------------------------------------------------------------ a JWKS server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JwksServer:
    """GET /jwks (and OIDC discovery) from a thread of its own, so a test can change what
    it serves while Regate (another process, or this loop) fetches from it.

    `keys` is what /jwks serves, `max_age` its Cache-Control, `down` makes every answer
    a 503; `fetches` counts GET /jwks."""

    def __init__(self, *keys: SigningKey, max_age: int | None = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = self.url
        self.jwks_url = f"{self.url}/jwks"
        self.doc: dict[str, Any] = jwks(*keys)
        self.max_age = max_age
        self.down = False
        self.fetches = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("JWKS server did not start")

    def serve(self, *keys: SigningKey, max_age: int | None | bool = False) -> None:
        self.doc = jwks(*keys)
        if max_age is not False:
            self.max_age = max_age  # type: ignore[assignment]

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async def keys(request: web.Request) -> web.Response:
            self.fetches += 1
            if self.down:
                return web.Response(status=503, text="down")
            headers = {"Cache-Control": f"max-age={self.max_age}"} if self.max_age is not None else {}
            return web.Response(body=orjson.dumps(self.doc), content_type="application/json", headers=headers)

        async def discovery(request: web.Request) -> web.Response:
            if self.down:
                return web.Response(status=503, text="down")
            return web.json_response({"issuer": self.issuer, "jwks_uri": self.jwks_url})

        app = web.Application()
        app.router.add_get("/jwks", keys)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class TlsUpstream:
    """An https tool that requires a client certificate from `client_ca`, in a thread of
    its own; it answers with the CN of the client certificate it was shown."""

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.load_verify_locations(cafile=str(client_ca))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.calls = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("TLS upstream did not start")

    async def _main(self) -> None:
        async def any_path(request: web.Request) -> web.Response:
            self.calls += 1
            cert = request.transport.get_extra_info("peercert") or {}
            cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
            return web.json_response({"client_cn": cn})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


CLAIMS_POLICY = """package regate

import rego.v1

# Every call is allowed; what the policy read of the caller goes to the tool as headers.
decision := {"allow": true, "headers": {"set": {
	"X-Seen-Agent": input.agent.id,
	"X-Seen-Team": object.get(input.agent.claims, "team", "-"),
	"X-Seen-Iss": object.get(input.agent.claims, "iss", "-"),
	"X-Seen-Spiffe": object.get(input.agent.claims, "spiffe_id", "-"),
	"X-Seen-Headers": concat(",", sort([k | some k, _ in input.request.headers])),
}}}
"""


def claims_policy(tmp: Path) -> dict:
    """policy: settings for a bundle that allows everything and shows the tool what it read."""
    rego, data = tmp / "rego", tmp / "data"
    rego.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    (rego / "policy.rego").write_text(CLAIMS_POLICY)
    return {"rego": str(rego), "data": str(data)}
