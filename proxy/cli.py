"""`regate` command line: serve, config check, policy test/eval, audit tools."""

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
        print(f"startup error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
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


def cmd_config_check(args) -> int:
    cfg = _load_config(args.config)
    from .app import Regate, StartupError

    async def check() -> None:
        app = Regate(cfg)
        await app.engine.start()
        await app.engine.close()
        print(f"config OK: {len(cfg.tools)} tools, engine {app.engine.name}, policy revision {app.engine.revision}")

    try:
        asyncio.run(check())
    except StartupError as exc:
        for line in str(exc).splitlines():
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except Exception as exc:
        problems = getattr(exc, "problems", None) or [str(exc)]
        for line in problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    return 0


def cmd_policy_test(args) -> int:
    from .policytool import run_policy_tests

    rego = args.dir or "rego/"
    return run_policy_tests(rego, args.data)


def cmd_policy_eval(args) -> int:
    from .policytool import eval_policy

    return eval_policy(args.rego, args.data, args.decision, args.input)


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
    p = argparse.ArgumentParser(prog="regate", description="Policy sidecar proxy for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("-c", "--config", default="regate.yaml")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default=os.environ.get("REGATE_LOG_LEVEL", "info"))
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file and compile its policy bundle")
    cc.add_argument("-c", "--config", default="regate.yaml")
    cc.set_defaults(func=cmd_config_check)

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pt = psub.add_parser("test", help="run the bundle's test_* rules (like `opa test`)")
    pt.add_argument("dir", nargs="?", default=None, help="rego directory (default rego/)")
    pt.add_argument("--data", default="policies/", help="data directory (default policies/)")
    pt.set_defaults(func=cmd_policy_test)
    pe = psub.add_parser("eval", help="print the decision for an input document")
    pe.add_argument("-i", "--input", required=True, help="input JSON file ('-' for stdin)")
    pe.add_argument("--rego", default="rego/")
    pe.add_argument("--data", default="policies/")
    pe.add_argument("--decision", default="regate/decision")
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
