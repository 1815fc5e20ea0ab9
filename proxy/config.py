"""regate.yaml: the pydantic models of the file users write, and loading it.

Validation happens once, at load time; the request path only reads the frozen
result. Every error names the field path (``tools[2].upstream: not a URL``) so a
bad file is fixed in one pass. ``${VAR}`` anywhere in a string is read from the
environment, so secrets stay out of the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `timout_ms` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _repeated(values: list[str]) -> list[str]:
    """The values given more than once, sorted: for "listed twice" errors."""
    return sorted({v for v in values if values.count(v) > 1})


def _host_port(value: str, field: str) -> tuple[str, int]:
    if not isinstance(value, str):
        # `listen: 8080` is a YAML number: say what to write, not pydantic's "valid string".
        raise ValueError(f"{field} must be HOST:PORT as a string, e.g. \"127.0.0.1:{value}\"; got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"{field} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class GpuDemand(_Section):
    memory_mb: int = Field(0, ge=0)
    device: int | None = None
    priority: int = 0


class McpOptions(_Section):
    """How Regate reads an MCP route (`protocol: mcp`); every key has a default."""

    # Largest JSON-RPC batch accepted; a bigger one is refused whole (JSON-RPC -32600).
    max_batch: int = Field(100, ge=1, le=100_000)
    # The OAuth protected resource metadata URL (RFC 9728) a 401 on this route points at,
    # as the MCP authorization spec asks: `WWW-Authenticate: Bearer resource_metadata="…"`.
    resource_metadata: str | None = None
    # How the allowed messages of a batch reach the server: as one reduced batch
    # (MCP 2025-03-26 servers), or one POST each (servers that no longer take batches).
    batch_upstream: Literal["batch", "split"] = "batch"
    # Remove from tools/list answers the tools the policy would refuse this agent.
    filter_tools_list: bool = True
    # A session id Regate did not see created: refuse it (404, the client opens a new
    # session) or bind it to the first agent that presents it (several workers, no shared store).
    unknown_sessions: Literal["refuse", "bind"] = "refuse"
    max_sessions: int = Field(100_000, ge=1)
    # Longest MCP tool name, and how many distinct names get their own limits/breaker key
    # (past it, unseen names share `<route>/*`, so a flood of invented names cannot grow tables).
    max_tool_name_length: int = Field(128, ge=1, le=4096)
    max_tool_names: int = Field(1000, ge=1)
    # Largest upstream answer (JSON body or one SSE event) Regate buffers to filter or merge;
    # a bigger one passes through unfiltered.
    max_message_bytes: int = Field(8 << 20, ge=1024)


class Tool(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    prefix: str | None = None
    host: str | None = None
    upstream: str
    timeout_ms: int = Field(30_000, gt=0)
    max_body_bytes: int = Field(1_048_576, ge=0)
    cost: float = Field(1.0, ge=0)
    protocol: Literal["http", "mcp"] = "http"
    # Only with protocol: mcp (defaults apply when absent).
    mcp: McpOptions | None = None
    gpu: GpuDemand = GpuDemand()
    fail_open: bool = False
    policy_mode: Literal["enforce", "shadow"] | None = None
    # What the tool reads, so the policy judges exactly that (README "One representation").
    # Methods and body media types the tool takes (null: any); others are 405 / 415
    # before the policy runs.
    methods: list[str] | None = None
    content_types: list[str] | None = None
    # Where the tool reads its arguments: a JSON body, the query string, or both (then a
    # key in both, or twice in the query, is refused as ambiguous).
    arguments: Literal["body", "query", "both"] = "both"
    # arguments: body and the query carries keys anyway: refuse the call, or forward it
    # without the query.
    unexpected_query: Literal["refuse", "strip"] = "refuse"
    # A query key given twice: refused (frameworks take the first, the last or all), or
    # judged as the list of every value.
    repeated_query_keys: Literal["refuse", "list"] = "refuse"
    # A body the policy cannot read (not JSON: text/plain, no Content-Type, octet-stream…):
    # refused (some tools parse JSON whatever the type and whatever `arguments` says), or
    # forwarded unread (uploads, files). A type listed in content_types is taken unread.
    unread_body: Literal["refuse", "forward"] = "refuse"
    # Media types read as JSON (exactly; `application/json` always). Another JSON-looking
    # type (application/*+json, text/json) is refused unless listed here.
    json_types: list[str] = ["application/json"]
    # int64: integers within +-(2**63-1); safe: within +-(2**53-1), for tools that read
    # JSON numbers as doubles (JavaScript).
    json_integers: Literal["int64", "safe"] = "int64"
    # Forward the body as sent, or the canonical JSON the policy judged (orjson's
    # serialisation of the parsed document, Content-Type: application/json).
    forward_body: Literal["as_sent", "canonical"] = "as_sent"
    # Identity and routing headers Regate drops by default (README "Headers a tool
    # receives") that this tool should get as the agent sent them.
    pass_headers: list[str] = []
    # An https upstream's CA, client certificate and name (README "TLS").
    tls: UpstreamTls | None = None

    @field_validator("upstream")
    @classmethod
    def _upstream_is_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not a URL (want http://host:port[/base])")
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/") or "//" in v or "/../" in f"{v}/" or "/./" in f"{v}/":
            raise ValueError("must be an absolute path like /tools/search")
        return v.rstrip("/") or "/"

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [m for m in v if not re.fullmatch(r"[A-Z]+", m)]
        if bad:
            raise ValueError(f"methods are upper-case HTTP method names, got {bad!r}")
        return v

    @field_validator("content_types", "json_types")
    @classmethod
    def _media_types(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = []
        for t in v:
            t = t.strip().lower()
            if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", t):
                raise ValueError(f"{t!r} is not a media type like application/json (no parameters)")
            out.append(t)
        return out

    @field_validator("pass_headers")
    @classmethod
    def _pass_headers(cls, v: list[str]) -> list[str]:
        from .forwarded_headers import IDENTITY_HEADERS

        low = [h.strip().lower() for h in v]
        unknown = [h for h in low if h not in IDENTITY_HEADERS]
        if unknown:
            raise ValueError(f"{unknown!r} are forwarded anyway; pass_headers names dropped headers: "
                             f"{', '.join(sorted(IDENTITY_HEADERS))}")
        return low

    @model_validator(mode="after")
    def _default_prefix(self) -> "Tool":
        if "application/json" not in self.json_types:
            object.__setattr__(self, "json_types", ["application/json", *self.json_types])
        if self.prefix is None and self.host is None:
            object.__setattr__(self, "prefix", f"/tools/{self.name}")
        if self.mcp is not None and self.protocol != "mcp":
            raise ValueError("mcp: settings for an MCP route; set protocol: mcp or remove them")
        if self.mcp is None and self.protocol == "mcp":
            object.__setattr__(self, "mcp", McpOptions())
        return self


class Admin(_Section):
    listen: str = "127.0.0.1:8081"
    # One full-rights token (every role), shared by whoever holds it: the approver's
    # name then comes from the request, unverified. Prefer `tokens`.
    token: str | None = None
    # Named operator tokens with roles (README "Operators"): the name is what the audit
    # and the inbox show for an approval.
    tokens: list[AdminToken] = []
    tls: ListenerTls | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        _host_port(v, "admin.listen")
        return v

    @model_validator(mode="after")
    def _unique_operators(self) -> "Admin":
        dup = _repeated([t.name for t in self.tokens])
        if dup:
            raise ValueError(f"admin.tokens: duplicate names {dup!r}: each operator has one name")
        return self


class Auth(_Section):
    # One identity source; `sources` lists several, tried in order (README "Identity").
    mode: Literal["none", "api_key", "jwt", "mtls"] = "api_key"
    sources: list[Literal["api_key", "jwt", "mtls"]] | None = None
    # api_key: the header, and the file mapping sha256(key) -> agent id (relative to the config file).
    header: str = "X-Api-Key"
    keys: str | None = "keys.yaml"
    jwt: JwtAuth | None = None
    mtls: MtlsAuth | None = None

    @field_validator("header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        # Header names with '_' are refused on the data port (SECURITY.md).
        if not re.fullmatch(r"[A-Za-z0-9-]+", v):
            raise ValueError("must be a header name of letters, digits and '-' (no '_')")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("list each of api_key, jwt, mtls at most once, at least one")
        return v

    @model_validator(mode="after")
    def _source_settings(self) -> "Auth":
        if self.sources is not None and self.mode == "none" and "mode" in self.model_fields_set:
            raise ValueError("auth: mode none trusts X-Agent-Id; it cannot be combined with sources")
        names = self.source_names
        if "jwt" in names and self.jwt is None:
            raise ValueError("auth.jwt: required when auth uses jwt (issuers, audiences, jwks)")
        if "mtls" in names and self.mtls is None:
            raise ValueError("auth.mtls: required when auth uses mtls (trust_domains, agents)")
        if "api_key" in names and not self.keys:
            raise ValueError("auth.keys: required when auth uses api_key")
        if self.jwt is not None and "api_key" in names and self.jwt.header.lower() == self.header.lower():
            raise ValueError(f"auth.jwt.header: {self.header} already carries the API key")
        return self

    @property
    def source_names(self) -> list[str]:
        """The identity sources, in the order they are tried; [] for mode none."""
        if self.sources is not None:
            return list(self.sources)
        return [] if self.mode == "none" else [self.mode]


class HttpLimits(_Section):
    """The HTTP parser's limits; defaults are aiohttp's, stated here so they are visible."""

    max_line_size: int = Field(8190, gt=0)
    max_field_size: int = Field(8190, gt=0)
    max_headers: int = Field(128, gt=0)
    keepalive_timeout_s: float = Field(75.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Hostile clients (SECURITY.md). A request head must arrive within header_timeout_s of
    # its first byte (slowloris); a body Regate reads for policy within body_timeout_s;
    # a streamed body may pause at most body_idle_timeout_s between chunks. 408 past each.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    body_idle_timeout_s: float = Field(10.0, gt=0)
    # Open data-port connections (503 past it) and calls in flight per agent (429 past
    # it; a call held for approval counts). 0: no cap.
    max_connections: int = Field(10_000, ge=0)
    max_concurrent_per_agent: int = Field(1000, ge=0)


class OpaServer(_Section):
    url: str = "http://127.0.0.1:8181"
    token: str | None = None


class BundleSigningKey(_Section):
    """The key a signed bundle is verified with (OPA's ``keys`` entry: key, algorithm, scope)."""

    # A PEM public key (or certificate): a file beside regate.yaml, or the PEM text
    # itself; for HS256/384/512 the shared secret (use ${VAR}).
    public_key: str
    algorithm: Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                       "EdDSA", "HS256", "HS384", "HS512"] = "RS256"
    # Must equal the signature's `scope` claim (opa build --claims-file); none: no scope.
    scope: str | None = None


class BundleService(_Section):
    """A bundle server polled as OPA's bundle plugin polls one (README "Bundle service")."""

    url: str                                    # the bundle itself: GET <url> answers a tarball
    poll_min_s: float = Field(60.0, gt=0)       # after a success, wait between min and max
    poll_max_s: float = Field(120.0, gt=0)      # (and back off up to max after errors)
    headers: dict[str, str] = {}                # e.g. Authorization: Bearer ${BUNDLE_TOKEN}
    timeout_s: float = Field(30.0, gt=0)        # one download, start to end
    signing_key: BundleSigningKey | None = None  # default: policy.bundle.signing_key
    # The last good bundle is kept here, so a restart serves it before the server
    # answers (relative: beside regate.yaml); null: not kept.
    persist_dir: str | None = ".regate/bundle"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname:
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v

    @model_validator(mode="after")
    def _poll(self) -> "BundleService":
        if self.poll_min_s > self.poll_max_s:
            raise ValueError(f"policy.bundle.service: poll_min_s ({self.poll_min_s}) is above poll_max_s "
                             f"({self.poll_max_s})")
        return self


class PolicyBundle(_Section):
    """An OPA bundle in place of policy.rego/policy.data: a file, or a bundle server."""

    # An `opa build` tarball (.tar.gz) or a directory in OPA's bundle layout.
    path: str | None = None
    # With a key, only bundles signed by it load (opa build --signing-key).
    signing_key: BundleSigningKey | None = None
    service: BundleService | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "PolicyBundle":
        if (self.path is None) == (self.service is None):
            raise ValueError("policy.bundle: set either path (a bundle file) or service (a bundle server)")
        return self


class Policy(_Section):
    engine: Literal["embedded", "opa", "off"] = "embedded"
    rego: str = "rego/"
    data: str = "policies/"
    decision: str = "regate/decision"
    timeout_ms: int = Field(50, gt=0)
    mode: Literal["enforce", "shadow"] = "enforce"
    opa: OpaServer = OpaServer()
    # Embedded engine. What the policy reads of a call (the input cut down to the
    # fields its rules name, as JSON) past this size is refused, 413
    # policy_input_too_large, before it is evaluated (regorus reads dense JSON at
    # ~35 ms per MiB here: much more could not be judged within timeout_ms).
    max_input_bytes: int = Field(2 << 20, gt=0)
    # Inputs up to this size are evaluated on the event loop (the hot path, no
    # process hop); larger ones in a worker process under timeout_ms, so a huge
    # call cannot hold up other agents' calls (regorus never releases the GIL).
    inline_input_bytes: int = Field(16 << 10, ge=0)
    # Worker processes for those larger inputs; 0: every input on the event loop
    # (then an evaluation over timeout_ms is refused only once it has finished).
    eval_processes: int = Field(1, ge=0)
    # auto: decide with the bundle compiled to Python from OPA's plan (`opa build -t
    # plan`; needs the opa binary), checked against regorus on every load, regorus
    # deciding whatever it does not support; off: regorus decides every call.
    compiled: Literal["auto", "off"] = "auto"
    # An OPA bundle (a tarball, or a bundle server) instead of the rego/data directories.
    bundle: PolicyBundle | None = None

    @model_validator(mode="after")
    def _bundle_engine(self) -> "Policy":
        if self.bundle is not None and self.engine != "embedded":
            raise ValueError(f"policy.bundle: the {self.engine} engine does not load bundles (an OPA server "
                             "loads its own: opa run --bundle, or its bundles config); remove policy.bundle "
                             "or use engine: embedded")
        return self

    @field_validator("decision")
    @classmethod
    def _decision_path(cls, v: str) -> str:
        v = v.strip("/").replace(".", "/")
        if v.startswith("data/"):
            v = v[5:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*", v):
            raise ValueError("must be a rule path like regate/decision")
        return v


class Limits(_Section):
    enabled: bool = True
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis slower than this counts as down for the call (then on_store_error applies).
    # It also bounds connection set-up (TCP/TLS/AUTH): raise it for a remote or TLS Redis.
    timeout_ms: int = Field(20, gt=0)
    on_store_error: Literal["local", "deny", "allow"] = "local"
    retry_interval_s: float = Field(1.0, gt=0)


class Audit(_Section):
    enabled: bool = True
    dir: str = "audit/"
    fsync: Literal["always", "interval", "never"] = "interval"
    interval_ms: int = Field(50, gt=0)
    segment_max_bytes: int = Field(64 << 20, ge=1024)
    checkpoint_every: int = Field(10_000, ge=1)
    heartbeat_s: float | None = Field(60.0, gt=0)
    # Ed25519 private key (PEM) that signs checkpoints; `regate audit keygen` makes one.
    signing_key: str | None = None


class Approvals(_Section):
    enabled: bool = True
    # async (default): 202 + an id to re-send with, at once, or after up to N seconds when the
    # agent sends `Prefer: wait=N` (RFC 7240); hold: the call waits for the human, up to
    # timeout_s, which most HTTP clients' default timeouts (5-30 s) do not survive.
    # A decision's approval.mode wins over `tools`, which wins over `mode`.
    mode: Literal["hold", "async"] = "async"
    tools: dict[str, Literal["hold", "async"]] = {}
    # How long a pending approval waits for a human.
    timeout_s: float = Field(120, gt=0)
    # async: how long after the approval the agent may re-send the call.
    use_within_s: float = Field(600, gt=0)
    # How long decided approvals stay readable (admin API, inbox, re-send answers).
    retain_s: float = Field(86_400, gt=0)
    # Pending approvals at most (all replicas sharing a store); past it, 503.
    max_pending: int = Field(1000, ge=1)
    # null: the limits section's store and redis_url, so one Redis serves both.
    store: Literal["memory", "redis"] | None = None
    redis_url: str | None = None


class GpuQueue(_Section):
    max: int = Field(64, ge=0)  # 0: never wait, shed what does not fit now
    wait_ms: int = Field(10_000, gt=0)


class GpuPerAgent(_Section):
    max_concurrent: int = Field(0, ge=0)  # 0: no cap
    max_queued: int = Field(0, ge=0)


class GpuHeadroom(_Section):
    # Calls below min_priority must leave this much memory free for higher ones.
    memory_mb: int = Field(0, ge=0)
    min_priority: int = 10


class GpuStaticDevice(_Section):
    memory_mb: int = Field(gt=0)
    name: str | None = None
    util_percent: float = Field(0, ge=0, le=100)


class Gpu(_Section):
    source: Literal["auto", "nvml", "static"] = "auto"
    sample_interval_ms: int = Field(250, ge=50)
    ceiling_util_percent: float = Field(95, ge=0, le=100)
    # How long after admission a reservation may still be missing from NVML's reading.
    settle_ms: int = Field(1000, ge=0)
    queue: GpuQueue = GpuQueue()
    per_agent: GpuPerAgent = GpuPerAgent()
    headroom: GpuHeadroom = GpuHeadroom()
    static: list[GpuStaticDevice] = []


class Tracing(_Section):
    """OpenTelemetry spans (needs the optional extra: pip install 'regate[otel]')."""

    # OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces; unset: no spans, no cost.
    otlp_endpoint: str | None = None
    service_name: str = "regate"
    sample_ratio: float = Field(1.0, ge=0, le=1)
    # Extra headers for the collector (an API key, a tenant id).
    headers: dict[str, str] = {}

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v


class Observability(_Section):
    # Decision traces kept in memory for the explain API (GET /admin/decisions/<id>); 0: off.
    traces: int = Field(1000, ge=0, le=100_000)
    # Which calls get the rule locations behind their reasons (a second, instrumented
    # evaluation): none, the ones the policy denied, or every call the policy saw.
    explain: Literal["off", "denied", "all"] = "denied"
    # Distinct values each agent/tool/reason metric label takes; the rest are counted as "other".
    label_cap: int = Field(1000, ge=1)
    # text: human lines; json: one JSON object per line (decision_id on every call's line).
    log_format: Literal["text", "json"] = "text"


class DecisionLogs(_Section):
    """OPA-format decision logs uploaded to a collector (README "Decision logs"); no url: off, no cost."""

    # The service: batches go to POST <url><resource>, as OPA's decision_logs plugin sends them.
    url: str | None = None
    resource: str = "/logs"
    headers: dict[str, str] = {}            # e.g. Authorization: Bearer ${LOGS_TOKEN}
    labels: dict[str, str] = {}             # added to `id` (instance) and `version`
    bundle: str = "regate"                  # the name in bundles.<name>.revision
    batch_max_bytes: int = Field(256 << 10, ge=512)   # one upload's JSON array, before gzip
    flush_s: float = Field(5.0, gt=0)                 # a partial batch waits at most this long
    buffer_max_bytes: int = Field(16 << 20, ge=1024)  # past it the oldest events are dropped (counted)
    timeout_s: float = Field(10.0, gt=0)
    backoff_min_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    # JSON pointers removed before an event leaves (/input/request/headers/x-secret), or
    # {op: upsert, path, value} objects; OPA's system.log.mask rules, given statically.
    mask: list[Any] = []

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v

    @field_validator("resource")
    @classmethod
    def _resource(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a path starting with '/', like /logs, got {v!r}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if "id" in v or "version" in v:
            raise ValueError("id and version are set by Regate (instance id, Regate version)")
        return v

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: list[Any]) -> list[Any]:
        from .decisionlogs.mask import MaskError, parse_rules

        try:
            parse_rules(v)
        except MaskError as exc:
            raise ValueError(str(exc)) from None
        return v


# ---- identity and transport (README "Identity", "TLS")

JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
ASYMMETRIC_ALGORITHMS: list[str] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                    "EdDSA"]


def _http_url(v: str | None, what: str) -> str | None:
    if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
        raise ValueError(f"{what}: not an http(s) URL: {v!r}")
    return v


class Jwks(_Section):
    """Where an issuer's signing keys come from: a JWKS URL, a file, or OIDC discovery."""

    url: str | None = None
    file: str | None = None
    # jwks_uri from <issuer>/.well-known/openid-configuration.
    discovery: bool = False
    # CA bundle for the URL (e.g. the cluster CA), and a file holding a bearer token for it
    # (e.g. the pod's own service-account token), re-read on every fetch.
    ca: str | None = None
    token_file: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    # The background refresh follows the answer's Cache-Control max-age, within these bounds
    # (no max-age: refresh_max_s); a failed fetch is retried every refresh_min_s.
    refresh_min_s: float = Field(60.0, gt=0)
    refresh_max_s: float = Field(3600.0, gt=0)
    # Keys last fetched longer ago than this are not used: tokens of this issuer are
    # refused (503) and /readyz says why. Fail closed, not open.
    stale_after_s: float = Field(86_400.0, gt=0)
    # A token naming a kid the cached set lacks triggers one refresh, at most this often.
    unknown_kid_interval_s: float = Field(30.0, ge=0)
    max_bytes: int = Field(1 << 20, ge=1024)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _http_url(v, "jwks.url")

    @model_validator(mode="after")
    def _one_place(self) -> "Jwks":
        given = [k for k in ("url", "file") if getattr(self, k)] + (["discovery"] if self.discovery else [])
        if len(given) != 1:
            raise ValueError(f"jwks: set exactly one of url, file or discovery: true (got {given or 'none'})")
        if self.refresh_min_s > self.refresh_max_s:
            raise ValueError("jwks.refresh_min_s: must not exceed refresh_max_s")
        return self


class JwtIssuer(_Section):
    """One token issuer: an OIDC provider, or a Kubernetes cluster's service-account issuer."""

    issuer: str                       # the exact `iss` of its tokens
    audiences: list[str] = Field(min_length=1)   # the token's `aud` must name one of these
    jwks: Jwks
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(ASYMMETRIC_ALGORITHMS), min_length=1)
    # The claim that is the agent id; `kubernetes: true` takes namespace/name from the
    # `kubernetes.io` claim of a service-account token instead.
    agent_claim: str = "sub"
    kubernetes: bool = False
    # Claims a token must carry (besides iss, aud and the agent claim).
    required_claims: list[str] = ["exp"]
    # Clock skew allowed on exp, nbf and iat.
    leeway_s: float = Field(30.0, ge=0, le=600)

    @model_validator(mode="after")
    def _discovery_needs_url(self) -> "JwtIssuer":
        if self.jwks.discovery:
            _http_url(self.issuer, "issuer (discovery: true reads <issuer>/.well-known/openid-configuration)")
        return self


class JwtAuth(_Section):
    # Where the token comes from: `Authorization: Bearer <jwt>` by default; another
    # header carries the bare token (scheme: null) or `<scheme> <jwt>`.
    header: str = "Authorization"
    scheme: str | None = "Bearer"
    max_token_bytes: int = Field(8192, ge=256)
    issuers: list[JwtIssuer] = Field(min_length=1)

    @field_validator("header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9-]+", v):
            raise ValueError("must be a header name of letters, digits and '-' (no '_')")
        return v

    @model_validator(mode="after")
    def _unique_issuers(self) -> "JwtAuth":
        dup = _repeated([i.issuer for i in self.issuers])
        if dup:
            raise ValueError(f"auth.jwt.issuers: {dup!r} listed twice; one entry per issuer")
        return self


class MtlsAuth(_Section):
    """Client certificates on the data listener (tls.client_ca) as identities."""

    # SPIFFE IDs (spiffe://<trust domain>/<path>) are accepted from these trust domains only.
    trust_domains: list[str] = []
    # SPIFFE ID, or CN=<common name> for certificates without one, -> agent id.
    agents: dict[str, str] = {}
    # A SPIFFE ID of an accepted trust domain that `agents` does not name: refused, or
    # its path (spiffe://td/ns/a/sa/b -> ns/a/sa/b), or the whole ID, is the agent id.
    unmapped: Literal["refuse", "path", "id"] = "refuse"

    @field_validator("trust_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        for td in v:
            if not re.fullmatch(r"[a-z0-9._-]+", td):
                raise ValueError(f"{td!r} is not a trust domain (lower-case letters, digits, '.', '-', '_'; "
                                 "no scheme: example.org, not spiffe://example.org)")
        return v


class AdminToken(_Section):
    """One operator: a name (what the audit shows), a secret, and roles."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
    # The secret (from the environment: ${ALICE_TOKEN}) or its SHA-256 hex digest.
    token: str | None = None
    sha256: str | None = None
    # viewer: read dashboards and approvals; approver: also approve and deny;
    # operator: also reload and reset breakers. Approver and operator include viewer.
    roles: list[Literal["viewer", "approver", "operator"]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> "AdminToken":
        if (self.token is None) == (self.sha256 is None):
            raise ValueError(f"admin.tokens[{self.name}]: set exactly one of token or sha256")
        if self.token is not None and len(self.token) < 16:
            raise ValueError(f"admin.tokens[{self.name}].token: at least 16 characters")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError(f"admin.tokens[{self.name}].sha256: must be 64 hex digits")
        return self


class ListenerTls(_Section):
    """TLS on a listener. Certificate, key and client CA are re-read on reload (SIGHUP)."""

    cert: str
    key: str
    # Require (or accept) client certificates chaining to this CA bundle (mTLS).
    client_ca: str | None = None
    client_auth: Literal["require", "optional"] = "require"
    min_version: Literal["1.2", "1.3"] = "1.2"


class UpstreamTls(_Section):
    """How Regate reaches an https upstream: its CA, a client certificate, the name to verify."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _pair(self) -> "UpstreamTls":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls: cert and key go together (the client certificate and its private key)")
        return self


class Config(_Section):
    listen: str = "127.0.0.1:8080"
    admin: Admin = Admin()
    auth: Auth = Auth()
    # TLS on the data listener (admin.tls for the admin one).
    tls: ListenerTls | None = None
    http: HttpLimits = HttpLimits()
    tools: list[Tool] = Field(min_length=1)
    policy: Policy = Policy()
    limits: Limits = Limits()
    breakers: dict[str, Any] = {}
    gpu: Gpu = Gpu()
    audit: Audit = Audit()
    approvals: Approvals = Approvals()
    metrics: bool = True
    tracing: Tracing = Tracing()
    observability: Observability = Observability()
    decision_logs: DecisionLogs = DecisionLogs()
    # Directory the file was read from: relative paths in it resolve against this.
    base_dir: str = "."

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        _host_port(v, "listen")
        return v

    @model_validator(mode="after")
    def _unique_routes(self) -> "Config":
        seen_names: dict[str, int] = {}
        seen_prefixes: dict[str, int] = {}
        for i, tool in enumerate(self.tools):
            if tool.name in seen_names:
                raise ValueError(f"tools[{i}].name: duplicate tool name {tool.name!r} (also tools[{seen_names[tool.name]}])")
            seen_names[tool.name] = i
            if tool.prefix is not None:
                if tool.prefix in seen_prefixes:
                    raise ValueError(
                        f"tools[{i}].prefix: {tool.prefix!r} already routes tools[{seen_prefixes[tool.prefix]}]"
                    )
                seen_prefixes[tool.prefix] = i
        _host_port(self.admin.listen, "admin.listen")
        return self

    @model_validator(mode="after")
    def _transport(self) -> "Config":
        if "mtls" in self.auth.source_names and (self.tls is None or self.tls.client_ca is None):
            raise ValueError("tls.client_ca: required when auth uses mtls (the CA that signs agents' certificates)")
        for i, tool in enumerate(self.tools):
            t = tool.tls
            if t is None:
                continue
            if not tool.upstream.startswith("https://"):
                raise ValueError(f"tools[{i}].tls: the upstream is {tool.upstream}; tls applies to https:// upstreams")
            # The forwarder knows no base directory: its files are resolved here, once.
            paths = {k: str(self.path(v)) for k in ("ca", "cert", "key") if (v := getattr(t, k))}
            object.__setattr__(tool, "tls", t.model_copy(update=paths))
        return self

    @property
    def listen_addr(self) -> tuple[str, int]:
        return _host_port(self.listen, "listen")

    @property
    def admin_addr(self) -> tuple[str, int]:
        return _host_port(self.admin.listen, "admin.listen")

    def path(self, relative: str) -> Path:
        """A path from the file, resolved against the file's own directory."""
        p = Path(relative)
        return p if p.is_absolute() else Path(self.base_dir) / p


# ${VAR} or ${VAR:-default}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, where: str, problems: list[str]) -> Any:
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name not in os.environ and default is not None:
                return default
            if name not in os.environ:
                problems.append(f"{where or '<root>'}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV_REF.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{where}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling against docs/configuration.md)"
    if err["type"] == "missing":
        return "required"
    return msg


def validate(raw: Any, base_dir: str = ".") -> Config:
    """Validate an already-parsed document; raise ConfigError with one line per problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: must be a mapping of settings"])
    problems: list[str] = []
    raw = _expand_env(raw, "", problems)
    if problems:
        raise ConfigError(problems)
    raw["base_dir"] = base_dir
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = _message(err)
            # Model-level validators already name their field in the message.
            if not err["loc"] and re.match(r"^[\w.\[\]]+: ", msg):
                lines.append(msg)
            else:
                lines.append(f"{_field_path(err['loc'])}: {msg}")
        raise ConfigError(lines) from None


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config file ({exc.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return validate(raw, base_dir=str(p.parent.resolve()))
