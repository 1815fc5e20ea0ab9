"""The configuration reference (docs/configuration.md), generated from proxy/config.py.

Every key of regate.yaml with its type, default and description, read from the
pydantic models themselves: types and defaults from the fields, constraints from
their metadata, descriptions from `Field(description=...)` or else from the
comments written beside the field in the source (a comment block above a run of
fields describes the run; a comment at the end of the line describes that field),
section descriptions from the model's docstring. `regate config reference` prints
it; `make docs` writes the file, and tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import config as config_mod

HEADER = """\
# Configuration reference

<!-- Generated from proxy/config.py by `regate config reference` (make docs): do not edit by hand. -->

Every key of `regate.yaml`, section by section: its type, its default, and what it
does. Every key but `tools` has a default, so the smallest useful file is a `tools`
list. Unknown keys are errors (a typo must not be ignored silently), and every error
names the key's path (`tools[2].upstream: not a URL`). `${VAR}` (or `${VAR:-default}`)
anywhere in a string is read from the environment. Relative paths are relative to
the directory of the config file.

`regate config check -c regate.yaml` validates a file and compiles its policy.
A fuller example with every section is `examples/regate.yaml`; the container
image's config is `deploy/container/regate.yaml`.
"""


# Descriptions for fields that proxy/config.py does not describe itself (neither
# Field(description=...) nor a comment beside the field), keyed "Model.field".
# What the source says wins: describe a field there and remove it here.
DESCRIPTIONS: dict[str, str] = {
    "Config.listen": "HOST:PORT of the data plane, where agents send their calls (0.0.0.0:8080 in a container).",
    "Config.admin": "The admin plane: health, readiness, metrics, the admin API and the approval inbox.",
    "Config.auth": "How a caller becomes an agent id: API keys, JWTs, client certificates, or (demo only) a trusted header.",
    "Config.http": "The data listener's HTTP limits and timeouts.",
    "Config.tools": "The route table: one entry per tool, matched by path prefix (or Host).",
    "Config.policy": "The policy engine, the bundle it evaluates and the decision rule it asks.",
    "Config.limits": "Rate limits and budgets (declared in the bundle's data, policies/limits): where their state lives.",
    "Config.breakers": "Tool breakers, per-agent backoff and the loop guard (`tool`, `agent`, `loop`; README \"Breakers and retry storms\" lists every key). Empty: the defaults.",
    "Config.gpu": "GPU admission for tools or decisions that declare `gpu.memory_mb`.",
    "Config.audit": "The append-only, hash-chained audit log: one record per call.",
    "Config.approvals": "Human approvals for calls whose decision requires one.",
    "Config.metrics": "Serve Prometheus metrics on the admin plane (`GET /metrics`); false: no collectors, no cost per call.",
    "Config.tracing": "OpenTelemetry spans, exported over OTLP/HTTP.",
    "Config.observability": "Decision traces, explanations, label caps and the log format.",
    "Config.decision_logs": "OPA-format decision logs, uploaded to a collector.",
    "Admin.listen": "HOST:PORT of the admin plane; keep it off the network agents reach.",
    "Admin.tls": "TLS on the admin listener.",
    "AdminToken.name": "The operator's name, shown in the audit and the inbox.",
    "AdminToken.sha256": "The token's SHA-256 hex digest, instead of the token itself.",
    "ListenerTls.cert": "PEM certificate chain of the listener.",
    "ListenerTls.key": "PEM private key of the certificate.",
    "ListenerTls.client_auth": "With `client_ca`: `require` refuses a handshake without a client certificate; `optional` accepts one without.",
    "ListenerTls.min_version": "Lowest TLS version accepted.",
    "Auth.sources": "Identity sources tried in order (instead of `mode`), e.g. `[jwt, api_key]` during a migration.",
    "Auth.keys": "api_key: the keys file (SHA-256 digest of each key -> agent id and claims), relative to the config file; re-read on reload.",
    "Auth.jwt": "JWT / OIDC bearer tokens, verified against the issuers' keys.",
    "Auth.mtls": "Client certificates (SPIFFE IDs or subjects) as identities.",
    "JwtAuth.scheme": "The scheme before the token in `header` (`Bearer`); null: the header holds the bare token.",
    "JwtAuth.max_token_bytes": "Longer tokens are refused before they are parsed.",
    "JwtAuth.issuers": "The issuers whose tokens are accepted.",
    "JwtIssuer.jwks": "Where the issuer's signing keys come from.",
    "JwtIssuer.algorithms": "Signature algorithms accepted (asymmetric only; `none` and HMAC never).",
    "JwtIssuer.kubernetes": "A Kubernetes service-account token: the agent id is `<namespace>/<service account>`.",
    "Jwks.url": "JWKS URL, fetched at start and refreshed in the background.",
    "Jwks.file": "JWKS file, relative to the config file; re-read on reload.",
    "Jwks.token_file": "A file holding a bearer token for the JWKS URL, re-read on every fetch.",
    "Jwks.timeout_s": "Per fetch of the JWKS (or the discovery document).",
    "Jwks.refresh_max_s": "Longest time between refreshes.",
    "Jwks.max_bytes": "Largest JWKS document accepted.",
    "HttpLimits.max_line_size": "Longest request line, in bytes (400 past it).",
    "HttpLimits.max_field_size": "Longest header field, in bytes.",
    "HttpLimits.max_headers": "Most header fields in one request.",
    "HttpLimits.keepalive_timeout_s": "An idle keep-alive connection is closed after this long.",
    "HttpLimits.shutdown_grace_s": "On SIGTERM: stop accepting, let in-flight calls finish for at most this long, then exit 0. Keep it below the container's stop timeout.",
    "HttpLimits.body_timeout_s": "A body Regate reads for the policy must arrive within this long (408 past it).",
    "HttpLimits.body_idle_timeout_s": "A streamed body may pause at most this long between chunks (408 past it).",
    "HttpLimits.max_concurrent_per_agent": "Calls in flight per agent (429 past it; a call held for approval counts). 0: no cap.",
    "Tool.name": "The tool's name, as policies, limits and metrics spell it.",
    "Tool.prefix": "Path prefix routed to this tool (`/tools/<name>` when neither prefix nor host is set); `<prefix>/x` goes to `<upstream>/x`.",
    "Tool.host": "Route calls whose Host header is this name to the tool.",
    "Tool.upstream": "The tool's base URL (`http://host:port[/base]` or https).",
    "Tool.timeout_ms": "Deadline to the upstream's response headers (504 past it); then the idle limit between reads of a streamed body. A decision may lower it, never raise it.",
    "Tool.max_body_bytes": "Largest request body (413 past it, declared or while streaming).",
    "Tool.cost": "Budget units a call spends when the decision names none.",
    "Tool.protocol": "`mcp`: the body is JSON-RPC (MCP); the policy judges each message (`tools/call`: the tool and its arguments).",
    "Tool.gpu": "The tool's GPU demand (the larger of the route's and the decision's wins).",
    "Tool.fail_open": "When the policy or the audit log cannot decide or record, let the call through (counted in `regate_fail_open_total`) instead of refusing it.",
    "Tool.policy_mode": "This tool's policy mode, over `policy.mode` (null: the policy's).",
    "Tool.content_types": "See `methods`: the body media types the tool takes (null: any).",
    "McpOptions.max_sessions": "MCP sessions remembered at most (session id -> agent).",
    "McpOptions.max_tool_names": "See `max_tool_name_length`.",
    "GpuDemand.memory_mb": "GPU memory one call needs, in MiB (0: not GPU-bound).",
    "GpuDemand.device": "The device index to admit on; null: the best fit.",
    "GpuDemand.priority": "Queue priority: higher is admitted first (FIFO within one).",
    "Policy.engine": "`embedded`: Rego in-process (regorus); `opa`: a real OPA server over its REST API; `off`: no policy (every call allowed).",
    "Policy.rego": "Directory of Rego modules (every *.rego below it), relative to the config file.",
    "Policy.data": "Directory of the bundle's data (JSON/YAML), relative to the config file.",
    "Policy.decision": "The rule asked for the decision (`regate/decision` is `data.regate.decision`).",
    "Policy.timeout_ms": "Longest a decision may take; past it the call is refused (`policy_error`) unless the tool is `fail_open`.",
    "Policy.mode": "`shadow`: compute and audit every decision, but forward denied calls too (counted in `regate_policy_would_deny_total`).",
    "Policy.opa": "The OPA server, for `engine: opa`.",
    "BundleSigningKey.algorithm": "The signature's algorithm (`opa build --signing-alg`).",
    "OpaServer.url": "Base URL of the OPA server (`POST <url>/v1/data/<decision>`).",
    "OpaServer.token": "Bearer token for the OPA server.",
    "Limits.enabled": "false: no rate limits or budgets are enforced.",
    "Limits.store": "Where the limits' state lives: this process's memory, or Redis shared by every replica and worker.",
    "Limits.redis_url": "Redis URL for `store: redis` (`rediss://` for TLS).",
    "Limits.on_store_error": "When Redis is down or slow: `local` limits each process in memory, `deny` refuses limited calls (503, not ready), `allow` passes them unlimited.",
    "Limits.retry_interval_s": "After a Redis failure, Redis is not tried again for this long.",
    "Gpu.source": "`auto`: NVML when it initialises, else the static view (with a warning saying why); `nvml`; `static`.",
    "Gpu.sample_interval_ms": "How often a background task reads NVML (never on the request path).",
    "Gpu.ceiling_util_percent": "A GPU busier than this admits no new call.",
    "Gpu.queue": "The admission queue.",
    "Gpu.per_agent": "Per-agent caps on GPU calls.",
    "Gpu.headroom": "Memory that low-priority calls must leave free.",
    "Gpu.static": "Device capacities for `source: static` (or when NVML is unavailable).",
    "GpuQueue.wait_ms": "Longest a queued call waits (the call's deadline also bounds it); then 503 `gpu_saturated`.",
    "GpuPerAgent.max_queued": "Queued GPU calls per agent (0: no cap).",
    "GpuHeadroom.min_priority": "Calls at or above this priority may use the headroom.",
    "GpuStaticDevice.memory_mb": "The device's memory, in MiB.",
    "GpuStaticDevice.name": "The device's name, for status pages.",
    "GpuStaticDevice.util_percent": "Utilisation the static view reports.",
    "Audit.enabled": "false: no audit log (not for production).",
    "Audit.dir": "Directory of the log's segments (`audit-w<worker>-<index>.jsonl`), relative to the config file; must be writable.",
    "Audit.fsync": "`always`: every batch is fsynced before its calls go on; `interval`: every `interval_ms`; `never`: left to the OS.",
    "Audit.interval_ms": "fsync period with `fsync: interval`.",
    "Audit.segment_max_bytes": "A segment rotates past this size; the next one chains to it.",
    "Audit.checkpoint_every": "A checkpoint record every N records (signed with `signing_key`).",
    "Audit.heartbeat_s": "... and every T seconds even when idle (null: only by count).",
    "Approvals.enabled": "false: a decision that requires approval is refused.",
    "Approvals.tools": "Per-tool approval mode, over `mode`.",
    "Approvals.redis_url": "Redis URL for `store: redis` (null: `limits.redis_url`).",
    "Tracing.service_name": "`service.name` of the spans.",
    "Tracing.sample_ratio": "Share of calls traced (parent-based: a sampled incoming `traceparent` is honoured).",
    "DecisionLogs.resource": "Path under `url` the batches are posted to (OPA's `decision_logs.resource`).",
    "DecisionLogs.timeout_s": "Per upload.",
    "DecisionLogs.backoff_min_s": "After a failed upload: wait this long, doubling, capped at `backoff_max_s`, jittered 50-100 %.",
    "DecisionLogs.backoff_max_s": "See `backoff_min_s`.",
}


@functools.lru_cache(maxsize=None)
def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comments written beside it in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    inline: dict[int, str] = {}
    standalone: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            if lines[row - 1][:col].strip():
                inline[row] = text
            else:
                standalone[row] = text
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    out: dict[str, str] = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        block: list[str] = []
        row = node.lineno - 1
        while row in standalone:
            block.insert(0, standalone[row])
            row -= 1
        text = " ".join(block)
        tail = " ".join(inline[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1) if r in inline)
        desc = " ".join(p for p in (text, tail) if p)
        if desc:
            out[name] = desc
    return out


def _description(model: type[BaseModel], name: str, field: Any, comments: dict[str, str]) -> str:
    """Field(description=...), else the comment beside it, else DESCRIPTIONS, else (a
    section) the first sentence of its model's docstring."""
    desc = field.description or comments.get(name) or DESCRIPTIONS.get(f"{model.__name__}.{name}", "")
    if not desc:
        sub, _ = _sub_model(field.annotation)
        if sub is not None and "__doc__" in vars(sub) and sub.__doc__:
            desc = inspect.getdoc(sub).split("\n\n")[0].replace("\n", " ")
    return desc


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _strip_none(t: Any) -> tuple[Any, bool]:
    if get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        nullable = len(args) != len(get_args(t))
        if len(args) == 1:
            return args[0], nullable
        return typing.Union[tuple(args)], nullable  # type: ignore[return-value]
    return t, False


def _type_name(t: Any) -> str:
    t, nullable = _strip_none(t)
    suffix = " or null" if nullable else ""
    origin = get_origin(t)
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in get_args(t)) + suffix
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(t)) + suffix
    if origin is list:
        (item,) = get_args(t) or (Any,)
        return f"list of {_type_name(item)}" + suffix
    if origin is dict:
        k, v = get_args(t) or (str, Any)
        return f"map of {_type_name(k)} to {_type_name(v)}" + suffix
    if _is_model(t):
        return "section" + suffix
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    if t is Any:
        return "any"
    return names.get(t, getattr(t, "__name__", str(t))) + suffix


def _constraints(field: Any) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for m in field.metadata:
        for attr, sign in signs.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sign} {v}")
        for attr, word in (("min_length", "at least {} item(s)"), ("max_length", "at most {} item(s)")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(word.format(v))
        pattern = getattr(m, "pattern", None)
        if pattern is not None:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(_plain(value), ensure_ascii=False)}`"


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sub_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field's value is (or holds, for list/dict), and the path suffix."""
    t, _ = _strip_none(annotation)
    if _is_model(t):
        return t, ""
    if get_origin(t) is list:
        (item,) = get_args(t)
        item, _ = _strip_none(item)
        if _is_model(item):
            return item, "[]"
    if get_origin(t) is dict:
        _, v = get_args(t)
        if _is_model(v):
            return v, ".<name>"
    return None, ""


def _section(model: type[BaseModel], path: str, out: list[str]) -> None:
    comments = _comments(model)
    hidden = {"base_dir"}  # set by the loader, not by users
    nested: list[tuple[str, type[BaseModel], str]] = []
    rows = []
    for name, field in model.model_fields.items():
        if name in hidden:
            continue
        key = f"{path}.{name}" if path else name
        sub, suffix = _sub_model(field.annotation)
        type_text = _type_name(field.annotation)
        if sub is not None:
            anchor = (key + suffix).replace(".", "").replace("[]", "").replace("<name>", "name").lower()
            type_text = f"{type_text} ([`{key + suffix}`](#{anchor}))"
        limits = _constraints(field)
        if limits:
            type_text += f"; {limits}"
        desc = _description(model, name, field, comments)
        rows.append(f"| `{name}` | {_cell(type_text)} | {_cell(_default(field))} | {_cell(desc)} |")
        if sub is not None:
            nested.append((key + suffix, sub, comments.get(name, "")))
    out.append(f"## {path}\n" if path else "## Top level\n")
    doc = inspect.getdoc(model) if model.__doc__ and model.__doc__ is not BaseModel.__doc__ else ""
    if doc and model is not config_mod.Config:
        out.append(doc.replace("\n", " ") + "\n")
    out.append("| key | type | default | description |")
    out.append("|---|---|---|---|")
    out.extend(rows)
    out.append("")
    for sub_path, sub, _ in nested:
        _section(sub, sub_path, out)


def undescribed(model: type[BaseModel] | None = None, path: str = "") -> list[str]:
    """Keys that have no description anywhere (tests/test_docs.py lists them)."""
    model = model or config_mod.Config
    comments = _comments(model)
    out = []
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        key = f"{path}.{name}" if path else name
        if not _description(model, name, field, comments):
            out.append(key)
        sub, suffix = _sub_model(field.annotation)
        if sub is not None:
            out += undescribed(sub, key + suffix)
    return out


def reference() -> str:
    """The whole reference, as Markdown."""
    out: list[str] = [HEADER]
    _section(config_mod.Config, "", out)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    import sys

    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
