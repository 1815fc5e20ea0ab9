"""`regate` command line: serve, healthcheck, config check/reference, policy test/eval, audit tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

from . import config as config_mod


def _load_config(path: str):
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(2)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_worker(cfg, index: int, reuse_port: bool) -> int:
    from .app import Regate, StartupError, install_signal_handlers

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; be kind if missing
        logging.getLogger("regate").warning("uvloop not available; using asyncio's default loop")

    async def main() -> None:
        app = Regate(cfg, worker_index=index)
        stop = asyncio.Event()
        install_signal_handlers(app, stop)
        await app.serve(stop, reuse_port=reuse_port, with_admin=(index == 0))

    try:
        asyncio.run(main())
    except StartupError as exc:
        for line in str(exc).splitlines():
            print(f"startup error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Listening errors arrive as StartupError naming the address; anything else
        # says which file it was about, not "cannot listen".
        what = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        print(f"startup error: {what}", file=sys.stderr)
        return 2
    return 0


def _supervise(args, workers: int) -> int:
    """Run N worker processes on one port (SO_REUSEPORT) and pass signals on."""
    env = dict(os.environ, REGATE_SUPERVISOR_PID=str(os.getpid()))
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "proxy", "serve", "-c", args.config, "--worker-index", str(i),
               "--log-level", args.log_level]
        procs.append(subprocess.Popen(cmd, env=env))
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    rc = 0
    while procs:
        for p in list(procs):
            code = p.poll()
            if code is None:
                continue
            procs.remove(p)
            if code != 0:
                rc = code
                if not stopping:
                    # One worker dying means the fleet is not what was asked for:
                    # stop the others and let the process supervisor restart us.
                    print(f"regate: worker pid {p.pid} exited with {code}; stopping", file=sys.stderr)
                    stopping = True
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    return rc


def cmd_serve(args) -> int:
    _setup_logging(args.log_level)
    cfg = _load_config(args.config)
    if args.worker_index is not None:
        return _run_worker(cfg, args.worker_index, reuse_port=True)
    if args.workers > 1:
        return _supervise(args, args.workers)
    return _run_worker(cfg, 0, reuse_port=False)


def _config_problems(cfg) -> tuple[list[str], str | None]:
    """Every file-level problem of a valid config at once (keys, TLS files, the bundle,
    limits), then the rest of start-up; returns (problems, policy revision)."""
    from .app import Regate, StartupError
    from .engines import BundleError, build_engine
    from .identity import CredentialsError, build_authenticator
    from .identity.tls import ListenerTls
    from .limits import LimitsError
    from .stages.ratelimit import load_limits_table

    problems: list[str] = []
    if cfg.auth.source_names:
        try:
            build_authenticator(cfg.auth, cfg.path)
        except CredentialsError as exc:
            problems += str(exc).splitlines()
    for where, section in (("tls", cfg.tls), ("admin.tls", cfg.admin.tls)):
        if section is not None:
            try:
                ListenerTls(section, cfg.path, where)
            except CredentialsError as exc:
                problems += str(exc).splitlines()
    revision = None

    async def compile_bundle() -> str:
        engine = build_engine(cfg)
        try:
            await engine.start()
            return engine.revision  # read while the engine is open: close() forgets it
        finally:
            await engine.close()

    try:
        revision = asyncio.run(compile_bundle())
    except BundleError as exc:
        problems += getattr(exc, "problems", None) or [str(exc)]
    if cfg.limits.enabled and cfg.policy.engine != "off":
        try:
            load_limits_table(cfg.path(cfg.policy.data))
        except LimitsError as exc:
            problems += str(exc).splitlines()
    if not problems:
        try:
            Regate(cfg)  # what only the whole process checks (breakers, observability, ...)
        except StartupError as exc:
            problems += str(exc).splitlines()
    return problems, revision


def cmd_config_check(args) -> int:
    cfg = _load_config(args.config)
    try:
        problems, revision = _config_problems(cfg)
    except Exception as exc:
        problems, revision = getattr(exc, "problems", None) or [str(exc)], None
    for line in problems:
        print(f"config error: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"config OK: {len(cfg.tools)} tools, engine {cfg.policy.engine}, policy revision {revision}")
    return 0


def cmd_config_reference(args) -> int:
    from .configdoc import reference

    sys.stdout.write(reference())
    return 0


def cmd_healthcheck(args) -> int:
    """GET /healthz on the config's admin listener: the container's HEALTHCHECK (no curl in the image)."""
    import ssl
    import urllib.request

    cfg = _load_config(args.config)
    host, port = cfg.admin_addr
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if cfg.admin.tls is not None else "http"
    url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}/healthz"
    context = None
    if scheme == "https":
        # The probe asks its own process on loopback: the certificate names the
        # service, not 127.0.0.1, and proves nothing here.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"regate healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _policy_paths(args) -> tuple[str, str, str]:
    """rego dir, data dir, decision path: given flags first, then the config's policy
    section (-c), then the defaults (rego/, policies/, regate/decision)."""
    rego, data, decision = "rego/", "policies/", "regate/decision"
    if getattr(args, "config", None):
        cfg = _load_config(args.config)
        rego, data, decision = str(cfg.path(cfg.policy.rego)), str(cfg.path(cfg.policy.data)), cfg.policy.decision
    given_rego = getattr(args, "dir", None) or getattr(args, "rego", None)
    return (given_rego or rego, args.data or data, getattr(args, "decision", None) or decision)


def cmd_policy_test(args) -> int:
    from .policytool import run_policy_tests

    rego, data, _ = _policy_paths(args)
    return run_policy_tests(rego, data)


def cmd_policy_eval(args) -> int:
    from .policytool import eval_policy, query_policy

    rego, data, decision = _policy_paths(args)
    if args.query is not None:
        return query_policy(rego, data, args.query, args.input)
    if args.input is None:
        print("error: give an input document (-i FILE, '-' for stdin), or a --query", file=sys.stderr)
        return 2
    return eval_policy(rego, data, decision, args.input)


def cmd_audit_verify(args) -> int:
    from .audit_verify import cmd_verify

    return cmd_verify(args.dir, args.public_key, now=args.now, allow_open=args.allow_open)


def cmd_audit_keygen(args) -> int:
    from .audit_verify import cmd_keygen

    return cmd_keygen(args.path)


def cmd_audit_tail(args) -> int:
    from .audit_verify import cmd_tail

    try:
        return cmd_tail(args.dir, args.agent, args.decision, not args.no_follow)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="regate", description="Policy sidecar proxy for AI agents.")
    p.add_argument("--version", action="version", version=f"regate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("-c", "--config", default="regate.yaml")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default=os.environ.get("REGATE_LOG_LEVEL", "info"))
    s.set_defaults(func=cmd_serve)

    h = sub.add_parser("healthcheck", help="exit 0 when the admin plane's /healthz answers 200 (container probes)")
    h.add_argument("-c", "--config", default="regate.yaml")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    h.set_defaults(func=cmd_healthcheck)

    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file and compile its policy bundle")
    cc.add_argument("-c", "--config", default="regate.yaml")
    cc.set_defaults(func=cmd_config_check)
    cr = csub.add_parser("reference", help="print the configuration reference (docs/configuration.md), every key")
    cr.set_defaults(func=cmd_config_reference)

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pt = psub.add_parser("test", help="run the bundle's test_* rules (like `opa test`)")
    pt.add_argument("dir", nargs="?", default=None, help="rego directory (default: -c's policy.rego, else rego/)")
    pt.add_argument("-c", "--config", default=None, help="read policy.rego and policy.data from this regate.yaml")
    pt.add_argument("--data", default=None, help="data directory (default: -c's policy.data, else policies/)")
    pt.set_defaults(func=cmd_policy_test)
    pe = psub.add_parser("eval", help="print the decision for an input document, or the value of any rule (--query)")
    pe.add_argument("-i", "--input", default=None, help="input JSON file ('-' for stdin)")
    pe.add_argument("-c", "--config", default=None,
                    help="read policy.rego, policy.data and policy.decision from this regate.yaml")
    pe.add_argument("--rego", default=None, help="rego directory (default: -c's policy.rego, else rego/)")
    pe.add_argument("--data", default=None, help="data directory (default: -c's policy.data, else policies/)")
    pe.add_argument("--decision", default=None,
                    help="the decision rule, as policy.decision in regate.yaml (default: -c's, else regate/decision)")
    pe.add_argument("-q", "--query", default=None,
                    help="print the value of this rule or Rego query instead (e.g. data.tools.shell.deny)")
    pe.set_defaults(func=cmd_policy_eval)

    aud = sub.add_parser("audit", help="audit log tools")
    asub = aud.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check every hash, link, sequence number and checkpoint signature")
    av.add_argument("dir", help="the audit directory (audit.dir)")
    av.add_argument("--public-key", default=None, help="PEM public key every checkpoint must be signed with")
    av.add_argument("--now", type=float, default=None,
                    help="judge the chain's end as of this Unix time (default: now)")
    av.add_argument("--allow-open", action="store_true",
                    help="a chain with no closing checkpoint (a crash, no restart yet) is a warning, not an error")
    av.set_defaults(func=cmd_audit_verify)
    ak = asub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints")
    ak.add_argument("path", help="writes PATH.key (private, 0600) and PATH.pub")
    ak.set_defaults(func=cmd_audit_keygen)
    at = asub.add_parser("tail", help="print records as they arrive, human-readable")
    at.add_argument("dir")
    at.add_argument("--agent", default=None)
    at.add_argument("--decision", default=None, help="allow | deny | shadow_deny | ...")
    at.add_argument("--no-follow", action="store_true", help="print what is there and exit")
    at.set_defaults(func=cmd_audit_tail)

    from .approvals.cli import add_parser as add_approvals_parser

    add_approvals_parser(sub)

    from .observability.cli import add_parser as add_explain_parser

    add_explain_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `regate audit tail ... | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
