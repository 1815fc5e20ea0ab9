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


def _host_port(value: str, field: str) -> tuple[str, int]:
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

    @model_validator(mode="after")
    def _default_prefix(self) -> "Tool":
        if self.prefix is None and self.host is None:
            object.__setattr__(self, "prefix", f"/tools/{self.name}")
        if self.mcp is not None and self.protocol != "mcp":
            raise ValueError("mcp: settings for an MCP route; set protocol: mcp or remove them")
        if self.mcp is None and self.protocol == "mcp":
            object.__setattr__(self, "mcp", McpOptions())
        return self


class Admin(_Section):
    listen: str = "127.0.0.1:8081"
    token: str | None = None


class Auth(_Section):
    mode: Literal["none", "api_key"] = "api_key"
    header: str = "X-Api-Key"
    # File mapping sha256(key) -> agent id; relative to the config file.
    keys: str | None = "keys.yaml"

    @field_validator("header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        # Header names with '_' are refused on the data port (SECURITY.md).
        if not re.fullmatch(r"[A-Za-z0-9-]+", v):
            raise ValueError("must be a header name of letters, digits and '-' (no '_')")
        return v


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


class Policy(_Section):
    engine: Literal["embedded", "opa", "off"] = "embedded"
    rego: str = "rego/"
    data: str = "policies/"
    decision: str = "regate/decision"
    timeout_ms: int = Field(50, gt=0)
    mode: Literal["enforce", "shadow"] = "enforce"
    opa: OpaServer = OpaServer()

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
    # hold: the call waits for the human; async: 202 + an id to re-send with.
    # A decision's approval.mode wins over `tools`, which wins over `mode`.
    mode: Literal["hold", "async"] = "hold"
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


class Config(_Section):
    listen: str = "127.0.0.1:8080"
    admin: Admin = Admin()
    auth: Auth = Auth()
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
    # Directory the file was read from: relative paths in it resolve against this.
    base_dir: str = "."

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
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
        return "unknown key (check the spelling against DESIGN.md's regate.yaml)"
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
