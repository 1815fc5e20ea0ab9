"""The two aiohttp servers of one Regate process — the data plane agents talk
to and the admin plane operators talk to — and their shared lifecycle.

`Regate` builds every part from a validated `Config` once, at startup: stages,
engine, upstream sessions, metrics. Nothing on the request path parses config.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import Any

from aiohttp import web, web_response

from .audit import AuditLog, AuditLogCorrupt, AuditLogInUse
from .config import Config
from .engines import BundleError, Engine, build_engine
from .metrics import Metrics
from .observability import Observability, ObservabilityError
from .pipeline import Pipeline, Stage
from .approvals import build_stage
from .breakers import Breakers, any_enabled, build
from .breakers import parse as parse_breakers
from .gpu import AdmissionConfig, AdmissionController, GpuCollector, GpuUnavailable, open_view
from .limits import LimitsError, LimitStores, LimitsTable, compile_limits, open_limit_stores
from .recorder import AuditRecorder
from .stages.breaker import STATE_VALUES, BreakerStage
from .stages.gpu import GpuAdmission
from .stages.ratelimit import RateLimit, load_limits_table
from .stages.body import ReadBody
from .identity import CredentialsError, build_authenticator
from .stages.identify import Identify
from .stages.policy import PolicyStage
from .mcp import unauthorized_challenges
from .stages.route import Route
from .upstream import Forwarder

log = logging.getLogger("regate")

# What aiohttp puts in `Server:` when a response has none (Regate's own answers, the admin
# plane, a tool's answer without one): not "Python/3.11 aiohttp/x.y", which tells a caller
# which library and version to probe. No version here either, for the same reason.
web_response.SERVER_SOFTWARE = "regate"


class StartupError(Exception):
    """Regate cannot start with this config; the message says what to fix."""


class Regate:
    def __init__(self, cfg: Config, worker_index: int = 0) -> None:
        self.cfg = cfg
        self.worker_index = worker_index
        self.metrics = Metrics(cfg.observability.label_cap) if cfg.metrics else None
        self.limit_stores: LimitStores | None = None
        self.gpu: GpuAdmission | None = None
        self.breakers: Breakers | None = None
        self.policy: PolicyStage | None = None
        self.approvals: Any = None
        self.ratelimit: RateLimit | None = None
        self.engine: Engine = build_engine(cfg)
        # policy.bundle.service: the poller that keeps the engine's bundle current (proxy/bundles).
        source = getattr(self.engine, "source", None)
        self.bundle_service: Any = source if hasattr(source, "poll_now") else None
        self.authenticator = self._authenticator()
        self.listener_tls = self._listener_tls()
        self.forwarder = Forwarder(cfg.tools, strip_request_headers=self._credential_headers(),
                                   body_idle_timeout_s=cfg.http.body_idle_timeout_s)
        self.audit: AuditLog | None = None
        self.recorder: AuditRecorder | None = None
        if cfg.audit.enabled:
            self.audit = AuditLog.from_config(cfg.audit, worker=worker_index, base_dir=cfg.base_dir)
            self.recorder = AuditRecorder(self.audit, self.metrics or Metrics(), self.engine)
        self.pipeline = Pipeline(self._stages(), self.forwarder, self.metrics, self.recorder)
        try:
            self.observability = Observability(cfg, self.engine, self.policy)
        except ObservabilityError as exc:
            raise StartupError(str(exc)) from None
        self.pipeline.observer = self.observability.observer
        if self.metrics is not None and self.audit is not None:
            self.metrics.watch_audit(self.audit)
        self.decision_logs = self._decision_logs()
        self.ready_problems: list[str] = []
        self._runners: list[web.BaseRunner] = []
        self._reload_lock = asyncio.Lock()

    def _decision_logs(self) -> Any:
        """OPA-format decision logs (proxy/decisionlogs) when decision_logs.url is set; else None."""
        dl = self.cfg.decision_logs
        if dl.url is None:
            return None
        if self.policy is None:
            log.warning("decision_logs: policy.engine is off, so there are no decisions to log")
            return None
        from .decisionlogs import DecisionLogger

        logger = DecisionLogger(dl, decision_path=self.cfg.policy.decision, engine_name=self.engine.name)
        self.policy.decision_log = logger
        if self.metrics is not None:
            self.metrics.watch_decision_logs(logger)
        return logger

    def _credential_headers(self) -> tuple[str, ...]:
        # With real auth, an X-Agent-Id from the agent is a claim Regate did not make: it never reaches
        # a tool, and neither do the credentials Regate verified (API key, bearer token).
        if self.authenticator is None:
            return ()
        return (*self.authenticator.credential_headers, "X-Agent-Id")

    def _authenticator(self) -> Any:
        """The identity sources of auth (proxy/identity); None for mode none."""
        auth = self.cfg.auth
        if not auth.source_names:
            log.warning("auth.mode is none: X-Agent-Id is trusted as sent. Use this for demos only.")
            return None
        try:
            return build_authenticator(auth, self.cfg.path)
        except CredentialsError as exc:
            raise StartupError(str(exc)) from None

    def _listener_tls(self) -> dict[str, Any]:
        """TLS of the data ("tls") and admin ("admin.tls") listeners that have it."""
        from .identity.tls import ListenerTls

        out = {}
        for where, section in (("tls", self.cfg.tls), ("admin.tls", self.cfg.admin.tls)):
            if section is not None:
                try:
                    out[where] = ListenerTls(section, self.cfg.path, where)
                except CredentialsError as exc:
                    raise StartupError(str(exc)) from None
        return out

    def _stages(self) -> list[Stage]:
        cfg = self.cfg
        from .stages.route import Route

        stages: list[Stage] = [
            Identify(self.authenticator),
            Route(cfg.tools),
            # The body is read when a stage reads it: the policy, or the loop guard
            # (which tells calls apart by their arguments).
            ReadBody(needs_body=cfg.policy.engine != "off" or self._loop_guard_on(),
                     timeout_s=cfg.http.body_timeout_s, judged=cfg.policy.engine != "off"),
        ]
        if cfg.http.max_concurrent_per_agent:
            from .stages.concurrency import AgentConcurrency

            stages.append(AgentConcurrency(cfg.http.max_concurrent_per_agent))
        if cfg.policy.engine != "off":
            self.policy = PolicyStage(cfg, self.engine, self.metrics or Metrics())
            if self.authenticator is not None:
                # Every source's credential header (a custom jwt.header too) is a secret the policy is not shown.
                creds = frozenset(h.lower() for h in self.authenticator.credential_headers)
                self.policy.hidden_headers = {t: h | creds for t, h in self.policy.hidden_headers.items()}
            stages.append(self.policy)
        if cfg.limits.enabled:
            stages.append(self._ratelimit_stage())
            if self.policy is not None:
                self.policy.limits = self.ratelimit  # enforces the decision's `limits`
        self.breakers = self._breakers()
        if self.breakers is not None:
            stages.append(BreakerStage(self.breakers, self.metrics))
        self.approvals = build_stage(self)
        if self.approvals is not None:
            stages.append(self.approvals)
            if self.policy is not None:
                self.policy.approvals_enabled = True
        if self._gpu_wanted():
            self.gpu = GpuAdmission(self.metrics or Metrics())
            stages.append(self.gpu)
            if self.policy is not None:
                self.policy.gpu = self.gpu  # state.gpu in the policy input
        from .stages.mcp import McpStage
        stages += McpStage.for_config(cfg, self.policy)
        return stages

    def _loop_guard_on(self) -> bool:
        try:
            parsed = parse_breakers(self.cfg.breakers, [t.name for t in self.cfg.tools])
        except ValueError:
            return False  # _breakers() reports the config error
        return any_enabled(parsed, "loop")

    def _breakers(self) -> Breakers | None:
        metrics = self.metrics

        def on_transition(tool: str, old: str, new: str, now: float, reason: str) -> None:
            log.warning("breaker for tool %s: %s -> %s (%s)", tool, old, new, reason)
            if metrics is not None:
                metrics.breaker_transitions.labels(tool, old, new).inc()
                metrics.breaker_state.labels(tool).set(STATE_VALUES.get(new, -1))

        try:
            breakers = build(self.cfg.breakers, tools=[t.name for t in self.cfg.tools], on_transition=on_transition)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if breakers.agents is None and breakers.loops is None and not any_enabled(breakers.config, "tool"):
            return None  # every guard off: no stage in the chain at all
        return breakers

    def _gpu_wanted(self) -> bool:
        """GPU admission runs when a tool declares GPU demand or the gpu section is set up."""
        g = self.cfg.gpu
        return any(t.gpu.memory_mb for t in self.cfg.tools) or g.source != "auto" or bool(g.static)

    async def _start_gpu(self) -> None:
        g = self.cfg.gpu
        try:
            view = await open_view(g.source, g.static, interval_s=g.sample_interval_ms / 1000)
        except GpuUnavailable as exc:
            raise StartupError(f"gpu.source: {exc}") from None
        controller = AdmissionController(view, AdmissionConfig.from_section(g))
        await view.start()
        self.gpu.controller = controller
        if self.metrics is not None:
            self.metrics.registry.register(GpuCollector(controller))
        log.info("gpu admission: %s", view.status)
        for t in self.cfg.tools:
            if t.gpu.memory_mb:
                problem = controller.check_demand(t.gpu.memory_mb, t.gpu.device, t.gpu.priority)
                if problem:
                    log.warning("tools[%s].gpu: %s", t.name, problem)

    def _ratelimit_stage(self) -> RateLimit:
        cfg = self.cfg
        metrics = self.metrics or Metrics()
        hooks = getattr(self.engine, "bundle_hooks", None)
        if hooks is not None:
            # The embedded engine's limits are its bundle's data.limits, whatever the bundle's
            # source (directories, a tarball, a bundle server): compiled with every bundle
            # and swapped in with it, all or nothing.
            table = LimitsTable()
            hooks.append(self._limits_of_bundle)
        else:
            try:
                table = load_limits_table(cfg.path(cfg.policy.data))
            except LimitsError as exc:
                raise StartupError(str(exc)) from None
        lim = cfg.limits
        self.limit_stores = open_limit_stores(
            lim.store, redis_url=lim.redis_url, on_store_error=lim.on_store_error, timeout_ms=lim.timeout_ms,
            retry_interval_s=lim.retry_interval_s,
            on_latency=lambda part, seconds: metrics.limit_store_latency.labels(part).observe(seconds),
        )
        self.ratelimit = RateLimit(table, self.limit_stores, metrics)
        return self.ratelimit

    def _limits_of_bundle(self, bundle: Any) -> Any:
        """Bundle hook: compile ``data.limits`` of a bundle about to serve; the commit swaps it in."""
        try:
            table = compile_limits(bundle.data.get("limits"), where=bundle.origin("limits"))
        except LimitsError as exc:
            raise BundleError([str(exc)]) from None

        def commit() -> None:
            if self.ratelimit is not None:
                self.ratelimit.table = table
        return commit

    def _bundle_installed(self, revision: str) -> None:
        """A bundle service put a new bundle in force (its own counters: regate_bundle_*)."""
        if self.metrics is not None:
            self.metrics.set_revision(revision)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self.authenticator is not None:
            try:
                await self.authenticator.start()  # JWKS files read, JWKS URLs fetched once
            except CredentialsError as exc:
                raise StartupError(str(exc)) from None
        try:
            await self.engine.start()
        except BundleError as exc:
            raise StartupError("\n".join(getattr(exc, "problems", None) or [str(exc)])) from None
        if self.metrics is not None:
            self.metrics.set_revision(self.engine.revision)
        if self.bundle_service is not None:
            self.bundle_service.on_install.append(self._bundle_installed)
            if self.metrics is not None:
                self.metrics.watch_bundle(self.bundle_service)
            await self.bundle_service.start()  # polls at once, then as OPA polls
        if self.audit is not None:
            try:
                await self.audit.start()
            except AuditLogInUse:
                raise StartupError(
                    f"audit.dir: another regate is already running with the audit log in {self.audit.dir} "
                    "(stop it, or give this one its own audit.dir and listen ports)") from None
            except (OSError, AuditLogCorrupt) as exc:
                raise StartupError(f"audit.dir: cannot continue the audit log in {self.audit.dir}: {exc}") from None
        if self.gpu is not None:
            await self._start_gpu()
        if self.approvals is not None:
            await self.approvals.start()
        try:
            await self.forwarder.start()
        except CredentialsError as exc:  # a tool's tls files
            raise StartupError(str(exc)) from None
        if self.decision_logs is not None:
            await self.decision_logs.start()

    async def close(self) -> None:
        if self.approvals is not None:
            await self.approvals.close()
        if self.gpu is not None and self.gpu.controller is not None:
            self.gpu.controller.close()
            await self.gpu.controller.view.stop()
        await self.forwarder.close()
        if self.authenticator is not None:
            await self.authenticator.close()
        if self.bundle_service is not None:
            await self.bundle_service.close()
        await self.engine.close()
        if self.limit_stores is not None:
            await self.limit_stores.aclose()
        if self.audit is not None:
            await self.audit.close()  # writes the closing checkpoint
        await self.observability.close()  # flushes spans still queued for export
        if self.decision_logs is not None:
            await self.decision_logs.close()  # one last upload of what is buffered, bounded by timeout_s

    async def reload(self) -> dict[str, Any]:
        """Reload the policy bundle and the credentials (keys.yaml, JWKS files, TLS
        certificates), each all or nothing: on any failure the old one keeps serving.
        Returns what was reloaded: {"reloaded", "revision", "policy", "credentials"}."""
        async with self._reload_lock:
            ok, detail = await self._reload_policy()
            creds = self._reload_credentials()
            policy: dict[str, Any] = {"reloaded": ok, "revision": self.engine.revision}
            if not ok:
                policy["error"] = detail
            return {"reloaded": ok and creds["reloaded"], "revision": self.engine.revision,
                    "policy": policy, "credentials": creds}

    def _reload_credentials(self) -> dict[str, Any]:
        """Every credential file read and checked first; then all swapped in one step (no await)."""
        try:
            staged = self.authenticator.prepare_reload() if self.authenticator is not None else []
            contexts = [(tls, tls.prepare()) for tls in self.listener_tls.values()]
        except CredentialsError as exc:
            log.error("credentials reload failed, the old ones stay in use:\n%s", exc)
            return {"reloaded": False, "error": str(exc), "what": []}
        what = self.authenticator.commit_reload(staged) if self.authenticator is not None else []
        what += [tls.commit(ctx) for tls, ctx in contexts]
        if what:
            log.info("credentials reloaded: %s", "; ".join(what))
        return {"reloaded": True, "what": what}

    async def _reload_policy(self) -> tuple[bool, str]:
        """Recompile the policy bundle; on any failure the old one keeps serving."""
        try:
            table = None
            if self.ratelimit is not None and getattr(self.engine, "bundle_hooks", None) is None:
                try:
                    table = load_limits_table(self.cfg.path(self.cfg.policy.data))
                except LimitsError as exc:
                    raise BundleError([str(exc)]) from None
            if self.bundle_service is not None:
                # With a bundle server, a reload is a poll now (the server has the bundle).
                revision = await self.bundle_service.poll_now()
            else:
                revision = await self.engine.reload()
            if table is not None:
                self.ratelimit.table = table
        except BundleError as exc:
            if self.metrics is not None:
                self.metrics.reloads.labels("error").inc()
            msg = "\n".join(getattr(exc, "problems", None) or [str(exc)])
            log.error("policy reload failed, still serving %s:\n%s", self.engine.revision, msg)
            return False, msg
        if self.metrics is not None:
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_revision(revision)
        log.info("policy reloaded: revision %s", revision)
        return True, revision

    def data_server(self) -> web.Server:
        from .ingress import IngressServer

        http = self.cfg.http
        handler = self.pipeline.handle
        challenges = unauthorized_challenges(self.cfg.tools, Route(self.cfg.tools).match)
        if challenges is not None:
            handler = challenges(handler)  # a 401 on an MCP route says how to authenticate
        if self.approvals is not None:
            # The agent's approval status URL (/_regate/approvals/<id>) comes before routing.
            handler = self.approvals.data_handler(handler)
        return IngressServer(
            handler,
            max_connections=http.max_connections,
            header_timeout=http.header_timeout_s,
            metrics=self.metrics,
            max_line_size=http.max_line_size,
            max_field_size=http.max_field_size,
            max_headers=http.max_headers,
            keepalive_timeout=http.keepalive_timeout_s,
            # Bodies pass as sent: what policy reads and what the tool receives are the same bytes.
            auto_decompress=False,
            access_log=None,  # no logging on the hot path: metrics and the audit log say what happened
        )

    def admin_app(self) -> web.Application:
        from .admin import admin_app

        return admin_app(self)

    async def serve(self, stop: asyncio.Event, reuse_port: bool = False, with_admin: bool = True) -> None:
        """Run both planes until `stop` is set, then drain in-flight calls."""
        try:
            await self._start_serving(reuse_port, with_admin)
        except BaseException:
            # A failed start releases what it opened (sessions, the audit lock), so the
            # only thing the operator sees is the StartupError, not "Unclosed client session".
            await self._abort_start()
            raise
        grace = self.cfg.http.shutdown_grace_s
        host, port = self.cfg.listen_addr
        log.info(
            "regate worker %d (pid %d) serving %s:%d, admin %s, engine %s, policy revision %s, tools: %s",
            self.worker_index, os.getpid(), host, port, self.cfg.admin.listen if with_admin else "off",
            self.engine.name, self.engine.revision, ", ".join(f"{t.name}→{t.upstream}" for t in self.cfg.tools),
        )
        # Everything built at startup (config, bundle, tables) is long-lived: move
        # it out of the collector's sight, and collect young objects less often,
        # since a call allocates many short-lived ones (GC was ~5% of CPU).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        await stop.wait()
        if self.approvals is not None:
            self.approvals.shutdown()  # held calls end now (503), not at the end of the grace
        log.info("regate worker %d: stopping; draining in-flight calls (grace %.0fs)", self.worker_index, grace)
        # Data plane first: stop accepting, let in-flight calls finish.
        for runner in self._runners:
            await runner.cleanup()
        await self.close()

    async def _abort_start(self) -> None:
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
                log.debug("cleanup after a failed start", exc_info=True)
        self._runners.clear()
        try:
            await self.close()
        except Exception:  # noqa: BLE001
            log.debug("close after a failed start", exc_info=True)

    async def _listen(self, runner: web.BaseRunner, where: str, host: str, port: int, **kw: Any) -> None:
        try:
            await web.TCPSite(runner, host, port, **kw).start()
        except OSError as exc:
            raise StartupError(f"{where}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    async def _start_serving(self, reuse_port: bool, with_admin: bool) -> None:
        await self.start()
        grace = self.cfg.http.shutdown_grace_s
        host, port = self.cfg.listen_addr
        data_runner = web.ServerRunner(self.data_server(), shutdown_timeout=grace, handle_signals=False)
        await data_runner.setup()
        self._runners.append(data_runner)
        data_tls = self.listener_tls.get("tls")
        await self._listen(data_runner, "listen", host, port, reuse_port=reuse_port, backlog=1024,
                           ssl_context=data_tls.context if data_tls is not None else None)
        if with_admin:
            admin_runner = web.AppRunner(self.admin_app(), shutdown_timeout=grace, handle_signals=False,
                                         access_log=None)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            ahost, aport = self.cfg.admin_addr
            admin_tls = self.listener_tls.get("admin.tls")
            await self._listen(admin_runner, "admin.listen", ahost, aport, reuse_port=reuse_port,
                               ssl_context=admin_tls.context if admin_tls is not None else None)


def install_signal_handlers(app: Regate, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        asyncio.ensure_future(app.reload())

    loop.add_signal_handler(signal.SIGHUP, on_hup)
