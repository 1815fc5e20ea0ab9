"""The compiled fast path of the embedded engine (``policy.compiled: auto``).

At bundle load, the real OPA compiles the bundle's modules to its intermediate
representation (``opa build -t plan``); ``compiler`` turns that plan into Python
source, one function per plan function, with ``data`` bound by reference. Then
a generated input set (``inputs``) is decided by the compiled path and by
regorus; on any difference, or on anything the compiler does not support (a
statement, a builtin, a non-deterministic builtin, no ``opa`` binary), the fast
path is refused, with the reason logged, and regorus decides every call.

Per call, an input the compiled path cannot decide exactly (a type it does not
model, a builtin argument of an odd type, a float in ``sprintf``...) raises
``runtime.Unsupported`` and that one call is handed to regorus.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import orjson

from . import runtime
from .compiler import PlanUnsupported, compile_plan

log = logging.getLogger("regate.engine.plan")

_UNDEFINED_JSON = '"<undefined>"'
#: Builtins whose answer can change between two evaluations of one input.
NONDETERMINISTIC = frozenset({
    "time.now_ns", "rand.intn", "uuid.rfc4122", "http.send", "opa.runtime", "net.lookup_ip_addr",
    "trace", "print", "io.jwt.decode_verify", "crypto.x509.parse_and_verify_certificates", "time.now",
})
#: Inputs decided both ways on every load before the fast path serves.
CHECK_INPUTS = 400


def find_opa() -> str | None:
    """The real OPA: $REGATE_OPA, the checkout's .tools/bin/opa, or opa on PATH."""
    env = os.environ.get("REGATE_OPA")
    if env and os.access(env, os.X_OK):
        return env
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / ".tools" / "bin" / "opa"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("opa")


_PLANS: dict[tuple, dict] = {}  # (opa, entry, sources) -> plan: a reload of unchanged Rego plans nothing


def build_plan(modules: list[tuple[str, str]], entry: str, opa: str | None = None, timeout_s: float = 60) -> dict:
    """OPA's plan for ``entry`` (e.g. ``regate/decision``) over these (name, source) modules."""
    opa = opa or find_opa()
    if opa is None:
        raise PlanUnsupported("no opa binary (set REGATE_OPA, or put opa on PATH)")
    key = (opa, entry, tuple(text for _, text in modules))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(modules, entry, opa, timeout_s)
        if len(_PLANS) >= 16:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _build_plan(modules: list[tuple[str, str]], entry: str, opa: str, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="regate-plan-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i, (_, text) in enumerate(modules):
            (src / f"m{i}.rego").write_text(text)
        out = Path(tmp) / "plan.tar.gz"
        proc = subprocess.run([opa, "build", "-t", "plan", "-e", entry, "-o", str(out), str(src)],
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise PlanUnsupported(f"opa build -t plan failed: {(proc.stderr or proc.stdout).strip()[:500]}")
        with tarfile.open(fileobj=io.BytesIO(out.read_bytes())) as tar:
            for member in tar.getmembers():
                if member.name.lstrip("/") == "plan.json":
                    f = tar.extractfile(member)
                    assert f is not None
                    return orjson.loads(f.read())
    raise PlanUnsupported("opa build -t plan wrote no plan.json")


class FastPath:
    """The compiled decision function: projected input JSON in, the rule's value as JSON out."""

    __slots__ = ("ev", "data", "source", "entry", "fallbacks", "strings")

    def __init__(self, ev: Callable, data: Any, source: str, entry: str, strings: list[str]) -> None:
        self.ev = ev
        self.data = data
        self.source = source
        self.entry = entry
        self.strings = strings
        self.fallbacks = 0  # inputs handed to regorus

    def eval_value(self, inp: Any) -> Any:
        """The rule's value, UNDEFINED as ``runtime.U``; raises Unsupported (or anything) to hand over."""
        res = self.ev(inp, self.data)
        if not res:
            return runtime.U
        if len(res) != 1:
            raise runtime.Unsupported("more than one result")
        return res[0]["result"]

    def eval_text(self, text: str) -> str | None:
        """The rule's value as JSON (as regorus's ``eval_rule_as_json``), or None: ask regorus."""
        try:
            value = self.eval_value(orjson.loads(text))
            if value is runtime.U:
                return _UNDEFINED_JSON
            return orjson.dumps(value, default=runtime.set_default).decode()
        except Exception:  # noqa: BLE001 - Unsupported, or a shape not modelled: regorus decides
            self.fallbacks += 1
            return None


def compile_fast_path(modules: list[tuple[str, str]], data_json: str | bytes, rule: str, *,
                      opa: str | None = None) -> FastPath:
    """Plan and compile ``rule`` (``data.regate.decision``); PlanUnsupported says why not."""
    entry = rule.removeprefix("data.").replace(".", "/")
    plan = build_plan(modules, entry, opa)
    used = {b["name"] for b in (plan.get("static") or {}).get("builtin_funcs") or ()}
    nondet = sorted(used & NONDETERMINISTIC)
    if nondet:
        raise PlanUnsupported(f"the policy calls non-deterministic builtins: {', '.join(nondet)}")
    ev, source = compile_plan(plan, entry)
    strings = [s["value"] for s in (plan.get("static") or {}).get("strings") or ()]
    return FastPath(ev, orjson.loads(data_json), source, entry, strings)


def same_answer(fast_json: str, regorus_json: str) -> bool:
    if fast_json == regorus_json:
        return True
    if _UNDEFINED_JSON in (fast_json, regorus_json):
        return False
    return runtime.eq(orjson.loads(fast_json), orjson.loads(regorus_json))


def differential(fast: FastPath, docs: Any, to_text: Callable[[Any], str],
                 regorus_eval: Callable[[str], str]) -> tuple[int, int, list[tuple[str, str, str]]]:
    """(decided by both, handed to regorus, differences as (input, fast, regorus))."""
    both = handed = 0
    diffs: list[tuple[str, str, str]] = []
    for doc in docs:
        text = to_text(doc)
        out = fast.eval_text(text)
        try:
            ref = regorus_eval(text)
        except Exception as exc:  # noqa: BLE001 - regorus refused: the fast path must not answer
            ref = f"<error: {exc}>"
        if out is None:
            handed += 1
            continue
        both += 1
        if ref.startswith("<error") or not same_answer(out, ref):
            diffs.append((text, out, ref))
    return both, handed, diffs


def build_checked(modules: list[tuple[str, str]], data_json: str | bytes, rule: str,
                  to_text: Callable[[Any], str], regorus_eval: Callable[[str], str], *,
                  n: int = CHECK_INPUTS, opa: str | None = None) -> FastPath | None:
    """The fast path, checked against regorus on ``n`` generated inputs; None (reason logged) if refused."""
    try:
        fast = compile_fast_path(modules, data_json, rule, opa=opa)
        from .inputs import generate
        data = fast.data if isinstance(fast.data, dict) else {}
        both, handed, diffs = differential(fast, generate(data, fast.strings, n), to_text, regorus_eval)
    except Exception as exc:  # noqa: BLE001 - whatever goes wrong here, regorus still serves the bundle
        log.warning("policy.compiled: the compiled fast path is off for this bundle, regorus decides: %s", exc)
        return None
    fast.fallbacks = 0
    if diffs:
        text, out, ref = diffs[0]
        log.warning("policy.compiled: the compiled fast path is off for this bundle: it decided %d of %d "
                    "generated inputs differently from regorus; first: input %s: compiled %s, regorus %s",
                    len(diffs), both, text[:400], out[:300], ref[:300])
        return None
    if both == 0:
        log.warning("policy.compiled: the compiled fast path is off: it decided none of %d generated inputs", n)
        return None
    log.info("policy.compiled: compiled fast path on (%d generated inputs agree with regorus, %d handed over)",
             both, handed)
    return fast
