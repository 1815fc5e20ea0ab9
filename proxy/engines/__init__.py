"""Policy engines: one interface, chosen by ``policy.engine`` in regate.yaml.

``embedded`` evaluates the bundle in-process with regorus; ``opa`` asks an OPA
server over its REST Data API; ``off`` allows every call (no policy stage
work at all: for benchmarks and for deployments that only want limits and the
audit log). Every engine answers ``evaluate(input) -> Decision`` or raises
``EngineError`` (could not answer) / ``DecisionError`` (answered nonsense or
nothing); the policy stage decides what either means for the call. Two kinds of
``EngineError`` mean something particular to the agent: ``EngineTimeout`` (no
answer within ``policy.timeout_ms``) and ``PolicyInputTooLarge`` (the input is
refused before evaluation: 413, never failed open).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .bundle import Bundle, BundleError, NoBundleYet, load_bundle
from .decision import Decision, DecisionError, EngineError, normalise, parse_decision

if TYPE_CHECKING:
    from proxy.config import Config

    from .bundle import BundleSource, SigningKey

__all__ = [
    "Bundle", "BundleError", "NoBundleYet", "Decision", "DecisionError", "Engine", "EngineError", "EngineTimeout", "OffEngine",
    "PolicyInputTooLarge", "build_engine", "load_bundle", "normalise", "parse_decision",
]


class EngineTimeout(EngineError):
    """The engine did not decide within ``policy.timeout_ms``."""


class PolicyInputTooLarge(EngineError):
    """What the policy would read is larger than ``policy.max_input_bytes``: refused
    before evaluation, because judging it could not finish in time (or costs too much)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"the policy input is {size} bytes, over the limit of {limit} bytes "
                         "(policy.max_input_bytes in regate.yaml): send a smaller request")


@runtime_checkable
class Engine(Protocol):
    name: str
    #: Content hash of the bundle the engine evaluates ("sha256:ab12cd34ef56").
    revision: str

    async def start(self) -> None: ...

    async def evaluate(self, input: dict) -> Decision: ...  # noqa: A002

    async def reload(self) -> str: ...

    async def close(self) -> None: ...


class OffEngine:
    """``policy.engine: off``: every call is allowed, with no reasons."""

    name = "off"
    revision = "off"

    async def start(self) -> None:
        return None

    async def evaluate(self, input: dict) -> Decision:  # noqa: A002
        # NOTE: allows everything by design; the operator switched policy off.
        return Decision(True)

    async def reload(self) -> str:
        return self.revision

    async def close(self) -> None:
        return None


def build_engine(cfg: "Config") -> Engine:
    """The engine regate.yaml asks for, not yet started (``await engine.start()``)."""
    policy = cfg.policy
    if policy.engine == "off":
        return OffEngine()
    rego_dir = cfg.path(policy.rego)
    data_dir = cfg.path(policy.data)
    if policy.engine == "opa":
        from .opa import OpaEngine

        return OpaEngine(policy.opa.url, policy.decision, timeout_ms=policy.timeout_ms,
                         token=policy.opa.token, rego_dir=rego_dir, data_dir=data_dir)
    from .embedded import EmbeddedEngine

    source = bundle_source(cfg)
    engine = EmbeddedEngine(rego_dir, data_dir, policy.decision, timeout_ms=policy.timeout_ms,
                            max_input_bytes=policy.max_input_bytes, inline_input_bytes=policy.inline_input_bytes,
                            eval_processes=policy.eval_processes, source=source, compiled=policy.compiled)
    if hasattr(source, "attach"):
        source.attach(engine)  # a bundle service installs what it downloads into this engine
    return engine


def bundle_source(cfg: "Config") -> "BundleSource | None":
    """Where ``policy.bundle`` says the bundle comes from; None: policy.rego + policy.data."""
    section = cfg.policy.bundle
    if section is None:
        return None
    from .bundle import FileSource

    if section.service is None:
        return FileSource(cfg.path(section.path), signing_key(cfg, section.signing_key, "policy.bundle.signing_key"))
    from proxy.bundles import BundleService

    svc = section.service
    key = svc.signing_key or section.signing_key
    where = "policy.bundle.service.signing_key" if svc.signing_key else "policy.bundle.signing_key"
    return BundleService(svc.url, poll_min_s=svc.poll_min_s, poll_max_s=svc.poll_max_s, headers=svc.headers,
                         timeout_s=svc.timeout_s, signing=signing_key(cfg, key, where),
                         persist_dir=cfg.path(svc.persist_dir) if svc.persist_dir is not None else None)


def signing_key(cfg: "Config", section: Any, where: str) -> "SigningKey | None":
    """The verification key of a ``signing_key`` section: PEM text, a PEM file beside
    regate.yaml (read when the bundle loads), or for HS* the shared secret."""
    if section is None:
        return None
    from .bundle import SigningKey

    key = section.public_key
    if section.algorithm.startswith("HS") or key.lstrip().startswith("-----BEGIN"):
        return SigningKey(key, section.algorithm, section.scope, where)
    return SigningKey.from_file(cfg.path(key), section.algorithm, section.scope, where)
