"""The embedded engine: the bundle's Rego evaluated in-process by regorus.

Loading does everything that can fail: parse every module, run regorus's
static checks, refuse builtins regorus lacks (naming them and pointing at
``policy.engine: opa``), and check that the decision rule exists. A reload
builds a complete new compiled bundle beside the serving one and swaps one
reference, so a call is evaluated against the old bundle or the new one,
never a half-loaded mix; a reload that fails leaves the old one serving.

Where a call is evaluated depends on the size of what the policy reads (the
input cut down to the fields the policy can read, as JSON): up to
``policy.inline_input_bytes`` on the event loop, the hot path (regorus holds
the GIL throughout an evaluation and its objects are bound to the thread that
made them, so a thread would neither run beside the loop nor share the
engine); larger in a worker process (``EvaluationPool``) under the
``policy.timeout_ms`` deadline, killed when it overruns, so one huge call
cannot stall other agents' calls; past ``policy.max_input_bytes`` not at all
(``PolicyInputTooLarge``, 413). An evaluation on the loop that spends more CPU
than ``policy.timeout_ms`` is refused as a timeout after the fact, as the
``opa`` engine's deadline would refuse it. Decisions on small inputs are
memoised per projected input, unless the policy calls a builtin whose answer
can change between two identical inputs (time, randomness, network).

Why the tree-walking interpreter and not regorus's RVM (its bytecode VM, 3-5x
faster here): on regorus 0.13 the RVM gets undefined wrong, e.g.
``r if { x := input.missing }`` is true and ``else`` branches are skipped,
which for a policy engine means calls allowed that OPA denies.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import itertools
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

# NOTE: regorus reports errors through anyhow, which captures a Rust backtrace
# for every error when RUST_BACKTRACE is set: about 100 ms of CPU per error, on
# the request path. Error messages need no backtrace; an explicit setting wins.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import regorus  # noqa: E402

from . import EngineTimeout, PolicyInputTooLarge
from .bundle import Bundle, BundleError, BundleSource, DirectorySource, NoBundleYet, roots_contain
from .decision import Decision, DecisionError, EngineError, parse_decision

log = logging.getLogger("regate.engine")

#: What eval_rule_as_json prints for an undefined rule.
_UNDEFINED_JSON = '"<undefined>"'


class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"


#: The value of a rule that produced nothing (OPA's "undefined").
UNDEFINED: Any = _Undefined()

#: Builtins whose result can differ between two evaluations of one input:
#: a policy calling any of them is never memoised.
NONDETERMINISTIC = frozenset({
    "time.now_ns", "rand.intn", "uuid.rfc4122", "http.send", "opa.runtime",
    "net.lookup_ip_addr", "trace", "print",
})

_MEMO_SIZE = 4096
#: Inputs longer than this are not memoised: a key is the whole projected input,
#: and 4096 keys of megabytes each would be gigabytes.
_MEMO_MAX_INPUT = 16 << 10

_LOCATION = re.compile(r"-->\s*(?P<file>.+?):(?P<line>\d+):(?P<col>\d+)")
_ERROR_LINE = re.compile(r"^error: (?P<msg>.*)$", re.M)


def format_regorus_error(exc: BaseException) -> str:
    """regorus's multi-line error (source excerpt, caret, backtrace) as ``file:line:col: message``."""
    text = str(exc).split("\nStack backtrace:", 1)[0].split("\nCaused by:", 1)[0]
    m = _ERROR_LINE.search(text)
    msg = m.group("msg").strip() if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), repr(exc))
    loc = _LOCATION.search(text)
    if loc:
        return f"{loc.group('file')}:{loc.group('line')}:{loc.group('col')}: {msg}"
    return msg


# --- What the AST tells us --------------------------------------------------


@dataclass
class Call:
    name: str
    nargs: int
    where: str
    builtin: bool


@dataclass
class PolicyScan:
    """The facts about a bundle's modules the engine needs before serving it."""

    calls: list[Call] = field(default_factory=list)
    # Static paths under input that the policy reads; None: it may read anything.
    input_paths: list[tuple[str, ...]] | None = field(default_factory=list)

    @property
    def builtins(self) -> set[str]:
        return {c.name for c in self.calls if c.builtin}


def ref_parts(node: dict) -> tuple[str | None, list[str | None], dict | None]:
    """(root variable, path parts from the root, None for a dynamic part, leftover non-ref node)."""
    parts: list[str | None] = []
    cur = node
    while True:
        if "RefDot" in cur:
            parts.append(cur["RefDot"]["field"][-1])
            cur = cur["RefDot"]["refr"]
        elif "RefBrack" in cur:
            idx = cur["RefBrack"]["index"]
            lit = idx.get("String") or idx.get("RawString")
            parts.append(lit["value"] if lit is not None else None)
            cur = cur["RefBrack"]["refr"]
        elif "Var" in cur:
            return cur["Var"]["value"], parts[::-1], None
        else:
            return None, parts[::-1], cur


def _static_name(node: dict) -> list[str] | None:
    root, parts, _ = ref_parts(node)
    if root is None or any(p is None for p in parts):
        return None
    return [root, *parts]  # type: ignore[list-item]


def scan_modules(ast_json: str, *, skip_tests: bool = True) -> PolicyScan:
    """Walk regorus's AST: calls (user function or builtin) and the input paths read."""
    modules = [m for m in orjson.loads(ast_json)
               if not (skip_tests and m["source"]["file"].endswith("_test.rego"))]
    rules: dict[tuple[str, ...], set[str]] = {}
    prepared = []
    for mod in modules:
        ast = mod["ast"]
        pkg = tuple(_static_name(ast["package"]["refr"]) or ())
        names = rules.setdefault(pkg, set())
        for rule in ast["rules"]:
            body = next(iter(rule.values()))
            ref = body.get("refr")  # default rules carry their ref directly
            if ref is None and body.get("head"):
                ref = next(iter(body["head"].values())).get("refr")
            if ref is not None:
                root, _, _ = ref_parts(ref)
                if root:
                    names.add(root)
        contents = mod["source"]["contents"].encode()
        aliases: dict[str, list[str]] = {}
        for imp in ast.get("imports", []):
            path = _static_name(imp["refr"]) or []
            span = imp.get("as")
            alias = contents[span["start"]:span["end"]].decode() if span else (path[-1] if path else "")
            aliases[alias] = path
        prepared.append((mod, pkg, aliases))
    scan = PolicyScan()
    for mod, pkg, aliases in prepared:
        _Walker(scan, mod["source"]["file"], pkg, aliases, rules).walk(mod["ast"])
    return scan


class _Walker:
    def __init__(self, scan: PolicyScan, file: str, pkg: tuple[str, ...], aliases: dict[str, list[str]],
                 rules: dict[tuple[str, ...], set[str]]):
        self.scan = scan
        self.file = file
        self.pkg = pkg
        self.aliases = aliases
        self.rules = rules

    def read(self, path: tuple[str, ...]) -> None:
        if not path:
            self.scan.input_paths = None  # the whole input: a call argument, `with`, ...
        elif self.scan.input_paths is not None:
            self.scan.input_paths.append(path)

    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item)
            return
        if not isinstance(node, dict):
            return
        if "RefDot" in node or "RefBrack" in node:
            self.ref(node)
            return
        var = node.get("Var")
        if isinstance(var, dict) and "value" in var:
            if var["value"] == "input":
                self.read(())
            return
        call = node.get("Call")
        if isinstance(call, dict) and "fcn" in call:
            name = _static_name(call["fcn"])
            if name is None:
                self.walk(call["fcn"])
            else:
                span = call.get("span") or {}
                self.scan.calls.append(Call(
                    ".".join(name), len(call.get("params") or []),
                    f"{self.file}:{span.get('line', '?')}:{span.get('col', '?')}",
                    builtin=not self._user_function(name),
                ))
            self.walk(call.get("params"))
            return
        for key, value in node.items():
            if key != "span":
                self.walk(value)

    def _user_function(self, name: list[str]) -> bool:
        # data.lib.f(x), lib.f(x) through `import data.lib`, or f(x) of this package.
        return name[0] == "data" or name[0] in self.aliases or name[0] in self.rules.get(self.pkg, ())

    def ref(self, node: dict) -> None:
        root, parts, leftover = ref_parts(node)
        if leftover is not None:
            self.walk(leftover)
        # Dynamic parts (input.x[y]) are expressions of their own: walk them.
        cur = node
        while "RefDot" in cur or "RefBrack" in cur:
            if "RefBrack" in cur:
                idx = cur["RefBrack"]["index"]
                if not (idx.get("String") or idx.get("RawString")):
                    self.walk(idx)
                cur = cur["RefBrack"]["refr"]
            else:
                cur = cur["RefDot"]["refr"]
        if root == "input":
            prefix = parts
        elif root in self.aliases and self.aliases[root][:1] == ["input"]:
            # `import input.request as req` then `req.x`: read through the alias.
            prefix = [*self.aliases[root][1:], *parts]
        else:
            return
        static: list[str] = []
        for p in prefix:
            if p is None:
                break
            static.append(p)
        self.read(tuple(static))


# OPA v1.22.4's builtins (`opa capabilities`, deprecated and internal ones left out), and
# those regorus lacks: `policy.engine: opa` helps only for a name in the second list.
OPA_BUILTINS = frozenset("""
    abs array.concat array.flatten array.reverse array.slice base64.decode base64.encode
    base64.is_valid base64url.decode base64url.encode base64url.encode_no_pad bits.and bits.lsh
    bits.negate bits.or bits.rsh bits.xor ceil concat contains count crypto.hmac.equal
    crypto.hmac.md5 crypto.hmac.sha1 crypto.hmac.sha256 crypto.hmac.sha512 crypto.md5
    crypto.parse_private_keys crypto.sha1 crypto.sha256 crypto.x509.parse_and_verify_certificates
    crypto.x509.parse_and_verify_certificates_with_options crypto.x509.parse_certificate_request
    crypto.x509.parse_certificates crypto.x509.parse_keypair crypto.x509.parse_rsa_private_key
    endswith floor format_int glob.match glob.quote_meta graph.reachable graph.reachable_paths
    graphql.is_valid graphql.parse graphql.parse_and_verify graphql.parse_query graphql.parse_schema
    graphql.schema_is_valid hex.decode hex.encode http.send indexof indexof_n intersection
    io.jwt.decode io.jwt.decode_verify io.jwt.encode_sign io.jwt.encode_sign_raw io.jwt.verify_eddsa
    io.jwt.verify_es256 io.jwt.verify_es384 io.jwt.verify_es512 io.jwt.verify_hs256
    io.jwt.verify_hs384 io.jwt.verify_hs512 io.jwt.verify_ps256 io.jwt.verify_ps384
    io.jwt.verify_ps512 io.jwt.verify_rs256 io.jwt.verify_rs384 io.jwt.verify_rs512 is_array
    is_boolean is_null is_number is_object is_set is_string json.filter json.is_valid json.marshal
    json.marshal_with_options json.match_schema json.patch json.remove json.unmarshal
    json.verify_schema lower max min net.cidr_contains net.cidr_contains_matches net.cidr_expand
    net.cidr_intersects net.cidr_is_valid net.cidr_merge net.lookup_ip_addr numbers.range
    numbers.range_step object.filter object.get object.keys object.remove object.subset object.union
    object.union_n opa.runtime print product providers.aws.sign_req rand.intn
    regex.find_all_string_submatch_n regex.find_n regex.globs_match regex.is_valid regex.match
    regex.replace regex.split regex.template_match rego.metadata.chain rego.metadata.rule
    rego.parse_module replace round semver.compare semver.is_valid sort split sprintf startswith
    strings.any_prefix_match strings.any_suffix_match strings.count strings.render_template
    strings.replace_n strings.reverse strings.split_n substring sum time.add_date time.clock
    time.date time.diff time.format time.now_ns time.parse_duration_ns time.parse_ns
    time.parse_rfc3339_ns time.weekday to_number trace trim trim_left trim_prefix trim_right
    trim_space trim_suffix type_name union units.parse units.parse_bytes upper uri.is_valid
    uri.parse urlquery.decode urlquery.decode_object urlquery.encode urlquery.encode_object
    uuid.parse uuid.rfc4122 walk yaml.is_valid yaml.marshal yaml.unmarshal
""".split())
OPA_ONLY_BUILTINS = frozenset("""
    array.flatten crypto.hmac.equal crypto.hmac.md5 crypto.hmac.sha1 crypto.hmac.sha256
    crypto.hmac.sha512 crypto.md5 crypto.parse_private_keys crypto.sha1 crypto.sha256
    crypto.x509.parse_and_verify_certificates crypto.x509.parse_and_verify_certificates_with_options
    crypto.x509.parse_certificate_request crypto.x509.parse_certificates crypto.x509.parse_keypair
    crypto.x509.parse_rsa_private_key graphql.is_valid graphql.parse graphql.parse_and_verify
    graphql.parse_query graphql.parse_schema graphql.schema_is_valid io.jwt.decode
    io.jwt.decode_verify io.jwt.encode_sign io.jwt.encode_sign_raw io.jwt.verify_eddsa
    io.jwt.verify_es256 io.jwt.verify_es384 io.jwt.verify_es512 io.jwt.verify_hs256
    io.jwt.verify_hs384 io.jwt.verify_hs512 io.jwt.verify_ps256 io.jwt.verify_ps384
    io.jwt.verify_ps512 io.jwt.verify_rs256 io.jwt.verify_rs384 io.jwt.verify_rs512
    net.cidr_contains_matches net.cidr_intersects net.cidr_merge net.lookup_ip_addr
    providers.aws.sign_req regex.globs_match rego.metadata.chain rego.metadata.rule
    rego.parse_module strings.render_template strings.split_n uri.is_valid uri.parse
""".split())


@functools.lru_cache(maxsize=512)
def regorus_has_builtin(name: str, nargs: int) -> bool:
    """Whether regorus implements ``name``: evaluate a call to it and read the error."""
    engine = regorus.Engine()
    args = ", ".join(["null"] * nargs)
    try:
        engine.add_policy("probe.rego", f"package regate_probe\n\nx := {name}({args})\n")
        engine.eval_rule("data.regate_probe.x")
    except RuntimeError as exc:
        return "could not find function" not in str(exc)
    return True


def missing_builtins(scan: PolicyScan) -> list[str]:
    """One problem line per call to a builtin regorus does not implement."""
    problems: list[str] = []
    for call in scan.calls:
        if call.builtin and not regorus_has_builtin(call.name, call.nargs):
            problems.append(f"{call.where}: {_missing_builtin_text(call.name)}")
    return list(dict.fromkeys(problems))


def _missing_builtin_text(name: str) -> str:
    if name in OPA_ONLY_BUILTINS:
        hint = ("Verify tokens in Regate's identify stage and pass the claims in input, or evaluate "
                if name.startswith("io.jwt.") else "Evaluate ")
        return (f"{name} is not available in the embedded engine (regorus): an OPA builtin it does "
                f"not implement. {hint}"
                "this bundle with an OPA server: set `policy.engine: opa` in regate.yaml.")
    close = difflib.get_close_matches(name, sorted(OPA_BUILTINS), n=1, cutoff=0.8)
    return (f"{name} is undefined: no builtin and no function of the bundle has that name"
            + (f" (did you mean {close[0]}?)" if close else "") + ".")


def _projection(paths: list[tuple[str, ...]] | None) -> dict | None:
    """The tree of input fields to keep; None keeps the whole input."""
    if paths is None:
        return None
    tree: dict = {}
    for path in sorted(paths, key=len):
        node = tree
        for key in path[:-1]:
            child = node.get(key)
            if child is True:
                break
            if child is None:
                child = node[key] = {}
            node = child
        else:
            node[path[-1]] = True
    return tree


def project(value: Any, tree: dict | None) -> Any:
    """The part of ``value`` that the projection tree keeps."""
    if tree is None or not isinstance(value, dict):
        return value
    out = {}
    for key, sub in tree.items():
        if key in value:
            v = value[key]
            out[key] = v if sub is True else project(v, sub)
    return out


# --- The compiled bundle -----------------------------------------------------


def _rule_path(decision: str) -> str:
    return "data." + decision.strip("/").replace("/", ".")


_SERIALS = itertools.count(1)


def add_modules(engine: regorus.Engine, modules: list[Any]) -> list[str]:
    """Add each module in its Rego version (a bundle's manifest may say v0); the problems."""
    problems: list[str] = []
    for module in modules:
        try:
            engine.set_rego_v0(bool(module.rego_v0))
            engine.add_policy(module.name, module.source)
        except RuntimeError as exc:
            problems.append(format_regorus_error(exc))
    engine.set_rego_v0(False)
    return problems


def outside_roots(ast_json: str, roots: list[str]) -> list[str]:
    """One problem per module whose package the manifest's roots do not permit (as OPA refuses it)."""
    if roots == [""] or not roots:
        return []
    problems = []
    for mod in orjson.loads(ast_json):
        pkg = _static_name(mod["ast"]["package"]["refr"]) or []
        path = "/".join(pkg[1:] if pkg[:1] == ["data"] else pkg)
        if not roots_contain(roots, path):
            problems.append(f"{mod['source']['file']}: .manifest roots {roots} do not permit "
                            f"package {'.'.join(pkg)}")
    return problems


class CompiledBundle:
    """One bundle loaded into regorus, ready to evaluate one rule."""

    __slots__ = ("engine", "rule", "revision", "bundle", "projection", "memo", "memo_size", "serial", "fast")

    def __init__(self, bundle: Bundle, decision: str, *, memo_size: int = _MEMO_SIZE,
                 compiled: str = "off") -> None:
        self.bundle = bundle
        self.revision = bundle.revision
        # Which compiled bundle a worker process holds: two bundles may share a
        # manifest revision, never a serial.
        self.serial = next(_SERIALS)
        self.rule = _rule_path(decision)
        engine = regorus.Engine()
        serving = [m for m in bundle.modules if not m.is_test]
        problems = add_modules(engine, serving)
        if problems:
            raise BundleError(problems)
        ast_json = engine.get_ast_as_json()
        problems = outside_roots(ast_json, bundle.roots)
        if problems:
            raise BundleError(problems)
        scan = scan_modules(ast_json)
        problems = missing_builtins(scan)
        if problems:
            raise BundleError(problems)
        try:
            engine.add_data_json(bundle.data_json)
        except RuntimeError as exc:
            raise BundleError(f"data: {format_regorus_error(exc)}") from None
        try:
            # The first evaluation runs regorus's static checks over every
            # module (unsafe variables, recursion): do it now, not on a call.
            engine.eval_query("true")
        except RuntimeError as exc:
            raise BundleError(format_regorus_error(exc)) from None
        self._check_rule(engine)
        self.projection = _projection(scan.input_paths)
        deterministic = not any(c.name in NONDETERMINISTIC for c in scan.calls)
        self.memo: dict[str, Any] | None = {} if deterministic and memo_size > 0 else None
        self.memo_size = memo_size
        self.engine = engine
        # policy.compiled: auto: the bundle compiled to Python from OPA's plan, checked
        # against regorus on generated inputs now; None: regorus decides every call.
        self.fast: Any = None
        if compiled == "auto":
            from .plan import build_checked
            self.fast = build_checked([(m.name, m.source) for m in serving], bundle.data_json, self.rule,
                                      self._input_text, self._eval_text)

    def _check_rule(self, engine: regorus.Engine) -> None:
        try:
            engine.set_input_json("{}")
            engine.eval_rule_as_json(self.rule)
        except RuntimeError as exc:
            text = str(exc)
            if "not a valid rule path" in text:
                raise BundleError(
                    f"{self.rule} is not defined by any module of the bundle "
                    "(policy.decision in regate.yaml names the rule Regate asks for)"
                ) from None
            if "recursion detected" in text:
                # A cycle does not depend on the input: every call would fail.
                raise BundleError(format_regorus_error(exc)) from None
            # Any other error comes from evaluating with an empty input; a
            # real call carries a full input document. Nothing to report.

    def _eval_text(self, text: str) -> str:
        fast = self.fast
        if fast is not None:
            out = fast.eval_text(text)
            if out is not None:  # None: an input the compiled path hands to regorus
                return out
        engine = self.engine
        try:
            engine.set_input_json(text)
            return engine.eval_rule_as_json(self.rule)
        except RuntimeError as exc:
            raise EngineError(f"policy evaluation failed: {format_regorus_error(exc)}") from None

    def input_bytes(self, input_doc: dict) -> bytes:
        """What regorus is given: the projected input as JSON."""
        try:
            return orjson.dumps(project(input_doc, self.projection))
        except TypeError as exc:  # orjson.JSONEncodeError
            raise EngineError(f"the input document is not JSON: {exc}") from None

    def _input_text(self, input_doc: dict) -> str:
        return self.input_bytes(input_doc).decode()

    def evaluate_raw(self, input_doc: dict) -> Any:
        """The rule's value as JSON carries it (sets as sorted arrays), or UNDEFINED."""
        out = self._eval_text(self._input_text(input_doc))
        return UNDEFINED if out == _UNDEFINED_JSON else orjson.loads(out)

    def decide(self, input_doc: dict) -> Decision:
        return self.decide_text(self._input_text(input_doc))

    def decide_text(self, text: str, cpu_budget_ns: int = 0) -> Decision:
        """The decision for one projected input, evaluated on this thread. With a
        budget, an evaluation that spent more CPU than that is an EngineTimeout."""
        memo = self.memo if len(text) <= _MEMO_MAX_INPUT else None
        if memo is not None:
            hit = memo.get(text)
            if hit is not None:
                if isinstance(hit, str):
                    raise DecisionError(hit)
                return _copy(hit)
        if cpu_budget_ns:
            # CPU time, not wall time: the loop thread being descheduled is not the
            # policy's doing, and must not refuse a cheap call on a busy machine.
            started = time.thread_time_ns()
            out = self._eval_text(text)
            spent = time.thread_time_ns() - started
            if spent > cpu_budget_ns:
                # Not memoised: the next identical call is timed again.
                raise EngineTimeout(f"the policy took {spent / 1e6:.0f} ms of CPU to decide, over "
                                    f"policy.timeout_ms ({cpu_budget_ns / 1e6:.0f} ms)")
        else:
            out = self._eval_text(text)
        return self.decision_from(out, text, memo)

    def decision_from(self, out: str, key: str | None = None, memo: dict[str, Any] | None = None) -> Decision:
        """The decision in the rule's JSON value ``out``; remembered under ``key`` in ``memo``."""
        try:
            if out == _UNDEFINED_JSON:
                raise DecisionError(f"decision is undefined: no rule of {self.rule} produced a value for this input")
            decision = parse_decision(orjson.loads(out), from_json=True)
        except DecisionError as exc:
            if memo is not None:
                self._remember(memo, key, str(exc))  # type: ignore[arg-type]
            raise
        except orjson.JSONDecodeError:
            raise EngineError("policy evaluation failed: the engine's answer is not JSON") from None
        if memo is not None:
            self._remember(memo, key, decision)  # type: ignore[arg-type]
            return _copy(decision)
        return decision

    def worker_payload(self) -> bytes:
        """What a worker process needs to evaluate this bundle (EvaluationPool)."""
        return orjson.dumps({
            "rule": self.rule,
            "modules": [[m.name, m.source, m.rego_v0] for m in self.bundle.modules if not m.is_test],
            "data": self.bundle.data_json,
        })

    def _remember(self, memo: dict[str, Any], key: str, value: Any) -> None:
        if len(memo) >= self.memo_size:
            del memo[next(iter(memo))]  # oldest first: dicts keep insertion order
        memo[key] = value


_DECISION_SLOTS = Decision.__slots__


def _copy(d: Decision) -> Decision:
    """A memoised decision handed out fresh, so no caller can change another's
    lists and headers (``raw`` and ``limits`` stay shared: read them only)."""
    c = Decision.__new__(Decision)
    for name in _DECISION_SLOTS:
        setattr(c, name, getattr(d, name))
    c.reasons = list(d.reasons)
    c.headers_set = dict(d.headers_set)
    c.headers_remove = list(d.headers_remove)
    c.approval_mask = list(d.approval_mask)
    return c


# --- Evaluation off the event loop ---------------------------------------------

#: Frames between Regate and a worker process: a 4-byte little-endian length, then
#: that many bytes, the first of which says what the frame is. To the worker:
#: b"L" + a bundle (CompiledBundle.worker_payload), b"E" + an input (JSON). Back:
#: b"K" (loaded), b"O" + the rule's value (JSON), b"X" + an error message.
_FRAME = struct.Struct("<I")
# The worker imports this module by the name Regate imported it under, from the
# directory Regate's package sits in (the child may start elsewhere on sys.path).
_WORKER_MAIN = f"from {__name__} import serve_worker; serve_worker()"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[len(__name__.split(".")) - 1])


def serve_worker() -> None:
    """A worker process (EvaluationPool): frames on stdin, answers on stdout, until stdin closes."""
    # Ctrl-C is for the Regate in front; it closes our stdin, and we end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed (a policy's print()) goes to stderr, never into an answer
    engine: Any = None
    rule = ""
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        (n,) = _FRAME.unpack(head)
        frame = inp.read(n)
        if len(frame) < n:
            return
        op, body = frame[:1], frame[1:]
        try:
            if op == b"E" and engine is not None:
                engine.set_input_json(body.decode())
                reply = b"O" + engine.eval_rule_as_json(rule).encode()
            elif op == b"L":
                doc = orjson.loads(body)
                new = regorus.Engine()
                for name, source, rego_v0 in doc["modules"]:
                    new.set_rego_v0(bool(rego_v0))
                    new.add_policy(name, source)
                new.add_data_json(doc["data"])
                new.eval_query("true")  # the static checks, before the first input
                engine, rule = new, doc["rule"]
                reply = b"K"
            else:
                reply = b"X" + b"the worker has no bundle loaded"
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, the loop goes on
            reply = b"X" + format_regorus_error(exc).encode()
        except BaseException as exc:  # a Rust panic arrives as pyo3's PanicException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            reply = b"X" + f"the engine panicked: {exc}".encode()
        out.write(_FRAME.pack(len(reply)) + reply)
        out.flush()


class _Worker:
    """One worker process, its pipes, and the compiled bundle (its serial) loaded in it."""

    __slots__ = ("proc", "reader", "reading", "writer", "revision")

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.reader: asyncio.StreamReader | None = None
        self.reading: asyncio.BaseTransport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.revision: int | None = None

    async def ensure(self, compiled: CompiledBundle) -> None:
        """Running, with ``compiled``'s bundle loaded."""
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            await self._spawn()
        if self.revision != compiled.serial:
            kind, body = await self.request(b"L", compiled.worker_payload())
            if kind != b"K":
                raise EngineError("the policy worker process could not load the bundle: "
                                  f"{body.decode(errors='replace')}")
            self.revision = compiled.serial

    async def _spawn(self) -> None:
        # subprocess.Popen with pipes of our own, not asyncio.create_subprocess_exec:
        # cancelling that one while it connects its pipes (a deadline, the loop
        # shutting down) can leave the cancelled task waiting for ever (CPython 3.11).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env=env, close_fds=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        self.reading, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), proc.stdout)
        self.reader = reader
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), proc.stdin)
        self.writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def request(self, op: bytes, payload: bytes) -> tuple[bytes, bytes]:
        writer, reader = self.writer, self.reader
        assert writer is not None and reader is not None
        writer.write(_FRAME.pack(len(payload) + 1) + op)
        writer.write(payload)
        await writer.drain()
        (n,) = _FRAME.unpack(await reader.readexactly(4))
        reply = await reader.readexactly(n)
        return reply[:1], reply[1:]

    def kill(self) -> subprocess.Popen | None:
        """Stop the process, whatever it is doing; the next ``ensure`` starts a fresh one."""
        proc, self.proc, self.revision = self.proc, None, None
        writer, reading, self.writer, self.reading, self.reader = self.writer, self.reading, None, None, None
        # The transports own the pipes and close them (never close a pipe under the loop).
        if writer is not None:
            writer.transport.abort()
        if reading is not None:
            reading.close()
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            _reap(proc)
        return proc


def _reap(proc: subprocess.Popen, tries: int = 100) -> None:
    """Collect a killed process's exit status without blocking the loop (no zombie left)."""
    if proc.poll() is None and tries > 0:
        try:
            asyncio.get_running_loop().call_later(0.02, _reap, proc, tries - 1)
        except RuntimeError:  # no loop any more: Popen's own clean-up collects it
            pass


class EvaluationPool:
    """Worker processes that evaluate inputs too large to judge on the event loop.

    Each worker holds its own regorus engine, built from the bundle's sources (an
    engine cannot cross threads, let alone processes). A call takes an idle worker,
    or waits for one; its deadline (the caller's ``asyncio.timeout``) covers the
    wait, the transfer and the evaluation. A worker whose request did not finish
    (deadline, cancellation, a broken pipe) is killed, since its state is unknown,
    and a fresh one is started in the background, so the next call finds it ready.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.killed = 0  # workers killed mid-request, most of them past a deadline
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] | None = None
        self._bundle: CompiledBundle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._killed_procs: list[subprocess.Popen] = []  # until their exit is collected
        self._closed = False

    def prepare(self, compiled: CompiledBundle) -> None:
        """Bring every worker to ``compiled`` in the background (starting them the first time)."""
        if self._closed:
            return
        self._bundle = compiled
        if self._idle is None:
            self._idle = asyncio.Queue()
            self._workers = [_Worker() for _ in range(self.size)]
            for worker in self._workers:
                self._background(self._make_ready(worker))
        else:
            for _ in range(self.size):
                self._background(self._refresh())

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self) -> None:
        assert self._idle is not None
        await self._make_ready(await self._idle.get())

    async def _make_ready(self, worker: _Worker) -> None:
        try:
            if self._bundle is not None:
                await worker.ensure(self._bundle)
        except asyncio.CancelledError:  # close(), or the loop shutting down without one
            proc = worker.kill()
            if proc is not None:
                try:
                    proc.wait(0.5)  # killed: gone within milliseconds, so no zombie is left
                except subprocess.TimeoutExpired:
                    pass
            raise
        except Exception as exc:  # noqa: BLE001 - the next call that takes it tries again
            worker.kill()
            log.warning("policy worker process could not be made ready: %s", exc)
        if self._closed or self._idle is None:
            worker.kill()
        else:
            self._idle.put_nowait(worker)

    async def evaluate(self, compiled: CompiledBundle, text: bytes) -> str:
        """The rule's value (JSON) for the projected input ``text``, from a worker."""
        if self._closed:
            raise EngineError("the embedded engine is closed")
        if self._idle is None:
            self.prepare(compiled)
        assert self._idle is not None
        worker = await self._idle.get()
        done = False
        try:
            await worker.ensure(compiled)
            kind, body = await worker.request(b"E", text)
            done = True
        except (OSError, EOFError) as exc:  # the process died or its pipes broke
            raise EngineError(f"the policy worker process failed: {exc.__class__.__name__}: {exc}") from None
        finally:
            if done:
                self._idle.put_nowait(worker)
            else:
                self.killed += 1
                proc = worker.kill()
                if proc is not None:
                    self._killed_procs = [p for p in self._killed_procs if p.poll() is None] + [proc]
                self._background(self._make_ready(worker))
        if kind != b"O":
            raise EngineError(f"policy evaluation failed: {body.decode(errors='replace')}")
        return body.decode()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        procs = [worker.kill() for worker in self._workers] + self._killed_procs
        self._idle = None
        self._workers, self._killed_procs = [], []
        await asyncio.sleep(0)  # the pipe transports close on the next turn of the loop
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(1)  # killed: gone within milliseconds
                except subprocess.TimeoutExpired:
                    pass


class EmbeddedEngine:
    """Engine protocol over regorus; see the module docstring.

    The bundle comes from ``source`` (Regate's two directories by default, an
    ``opa build`` tarball, or a bundle service's last good bundle) on start and
    reload, or is handed in by ``install`` (a bundle service that downloaded a
    new one). A source with no bundle yet (``NoBundleYet``) leaves the engine
    started but unloaded: every call is an EngineError until a bundle arrives.
    """

    name = "embedded"

    def __init__(self, rego_dir: str | Path | None, data_dir: str | Path | None,
                 decision: str = "regate/decision", *, memo_size: int = _MEMO_SIZE, timeout_ms: int = 50,
                 max_input_bytes: int = 2 << 20, inline_input_bytes: int = 16 << 10,
                 eval_processes: int = 0, source: BundleSource | None = None, compiled: str = "off") -> None:
        self.rego_dir = Path(rego_dir) if rego_dir is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.source = source if source is not None else DirectorySource(self.rego_dir or Path("."), self.data_dir)
        self.decision = decision
        self.memo_size = memo_size
        self.compiled_mode = compiled  # policy.compiled
        self.timeout_ms = timeout_ms
        self._timeout_s = timeout_ms / 1000
        self._cpu_budget_ns = timeout_ms * 1_000_000
        self.max_input_bytes = max_input_bytes
        self.inline_input_bytes = inline_input_bytes
        # None: every input is evaluated on the loop (regate.yaml's default is one worker;
        # built directly, as tools and tests do, the engine starts no process).
        self.pool = EvaluationPool(eval_processes) if eval_processes > 0 else None
        self._compiled: CompiledBundle | None = None
        self._reload_lock: asyncio.Lock | None = None
        #: Each is called with a bundle about to serve, after it compiled: it checks what
        #: else the bundle feeds (the rate limiter's data.limits) and returns a commit to
        #: run at the swap (or None), or raises BundleError to refuse the bundle.
        self.bundle_hooks: list[Callable[[Bundle], Callable[[], None] | None]] = []
        #: Why there is no bundle, when there is none: what every call is refused with.
        self.unloaded_reason = "the embedded engine has not been started"

    @classmethod
    def from_bundle(cls, bundle: Bundle, decision: str = "regate/decision", *,
                    memo_size: int = _MEMO_SIZE, **limits: Any) -> "EmbeddedEngine":
        engine = cls(bundle.rego_dir or Path("."), bundle.data_dir, decision, memo_size=memo_size, **limits)
        engine._compiled = CompiledBundle(bundle, decision, memo_size=memo_size, compiled=engine.compiled_mode)
        return engine

    @property
    def revision(self) -> str:
        return self._compiled.revision if self._compiled else "unloaded"

    @property
    def bundle(self) -> Bundle | None:
        """The bundle serving now (None before the first one)."""
        return self._compiled.bundle if self._compiled else None

    @property
    def compiled(self) -> CompiledBundle:
        if self._compiled is None:
            raise EngineError(self.unloaded_reason)
        return self._compiled

    def load(self) -> str:
        """Load (or reload) synchronously; BundleError leaves the serving bundle in place."""
        return self.install(self.source.load())

    def install(self, bundle: Bundle) -> str:
        """Compile ``bundle`` beside the serving one, then swap: one reference, so a call is
        judged by the old bundle or the new one, never a mix. BundleError (the bundle or a
        hook refused it) leaves the serving bundle in place. Runs on the loop's thread:
        regorus objects belong to the thread that made them."""
        compiled = CompiledBundle(bundle, self.decision, memo_size=self.memo_size, compiled=self.compiled_mode)
        commits = [hook(bundle) for hook in self.bundle_hooks]
        # The swap: no await from here on.
        self._compiled = compiled
        for commit in commits:
            if commit is not None:
                commit()
        if self.pool is not None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # load() outside a loop: start() brings the workers along
                pass
            else:
                self.pool.prepare(compiled)  # the workers follow, in the background
        return compiled.revision

    async def start(self) -> None:
        if self._compiled is None:
            try:
                await self.reload()
            except NoBundleYet as exc:
                # NOTE: not a startup failure. Calls are refused (policy_error) and
                # readiness says why until the bundle service delivers a bundle.
                self.unloaded_reason = str(exc)
                log.warning("policy: %s", exc)
            except BundleError as exc:
                if getattr(self.source, "required", True):
                    raise
                # A bundle service's kept bundle that no longer loads: wait for the server.
                self.unloaded_reason = f"no policy bundle yet: the kept bundle is refused ({exc.problems[0]})"
                log.error("policy: the kept bundle from %s is refused, waiting for the server:\n%s",
                          self.source, exc)
        elif self.pool is not None:
            self.pool.prepare(self._compiled)

    async def evaluate(self, input: dict) -> Decision:  # noqa: A002 - the protocol's name
        compiled = self._compiled
        if compiled is None:
            raise EngineError(self.unloaded_reason)
        text = compiled.input_bytes(input)
        size = len(text)
        if size > self.max_input_bytes:
            raise PolicyInputTooLarge(size, self.max_input_bytes)
        pool = self.pool
        if pool is None or size <= self.inline_input_bytes:
            # The hot path: decided on the loop, no await, no thread or process hop.
            return compiled.decide_text(text.decode(), self._cpu_budget_ns)
        try:
            async with asyncio.timeout(self._timeout_s):
                out = await pool.evaluate(compiled, text)
        except TimeoutError:
            raise EngineTimeout(f"the policy did not decide within policy.timeout_ms ({self.timeout_ms} ms) "
                                f"on an input of {size} bytes") from None
        return compiled.decision_from(out)  # large inputs are not memoised

    def evaluate_raw(self, input: dict) -> Any:  # noqa: A002
        return self.compiled.evaluate_raw(input)

    async def reload(self) -> str:
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            # Reading files, unpacking, verifying and parsing YAML happens off the loop.
            bundle = await asyncio.to_thread(self.source.load)
            return self.install(bundle)

    async def close(self) -> None:
        self._compiled = None
        self.unloaded_reason = "the embedded engine is closed"
        if self.pool is not None:
            await self.pool.close()
            self.pool = EvaluationPool(self.pool.size)  # a later start() starts fresh workers
