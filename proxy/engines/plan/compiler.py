"""OPA's intermediate representation (``opa build -t plan``) compiled to Python source.

One Python function per plan function, locals as Python locals (``U`` while
undefined), each IR block a ``while True: ... break`` loop so that an undefined
statement (and ``BreakStmt`` 0) is a ``break``; ``BreakStmt`` N sets ``_b = N``
and every enclosing block passes it on. Rules without arguments (plan functions
of just input and data) are memoised for one evaluation. OPA's compiler has
already lowered Rego (``else``, ``not``, ``every``, comprehensions, defaults,
undefined), so the statements are few and plain. A plan with a statement, a
builtin or a shape this module does not know raises ``PlanUnsupported``.
"""

from __future__ import annotations

from typing import Any

from . import runtime as rt


class PlanUnsupported(Exception):
    """The plan uses something the compiler does not support."""


#: Statements that change a local's value in place: their target must be a local
#: the same function made with a Make* statement (never data, never a rule's value).
_MUTATORS = {"ArrayAppendStmt": "array", "ObjectInsertStmt": "object", "ObjectInsertOnceStmt": "object",
             "SetAddStmt": "set"}
_MAKERS = {"MakeArrayStmt", "MakeObjectStmt", "MakeSetStmt"}
_MAX_DEPTH = 15
#: Statements that always run to the next one (no undefined, no break).
_NEVER_STOP = {"AssignVarStmt", "ResetLocalStmt", "MakeNullStmt", "MakeNumberIntStmt", "MakeNumberRefStmt",
               "ArrayAppendStmt", "ObjectInsertStmt", "SetAddStmt", "NopStmt", "ResultSetAddStmt"}  # Python allows 20 statically nested blocks


def _walk(blocks: list, fn: Any, depth: int = 0) -> None:
    for block in blocks:
        for s in block["stmts"]:
            fn(s, depth)
            st = s["stmt"]
            if s["type"] == "BlockStmt":
                _walk(st["blocks"], fn, depth + 1)
            elif s["type"] in ("NotStmt", "ScanStmt"):
                _walk([st["block"]], fn, depth + 1)


class _Func:
    def __init__(self, comp: "Compiler", name: str, pyname: str, params: list[int], ret: int | None,
                 blocks: list, memo_slot: int | None) -> None:
        self.comp = comp
        self.name = name
        self.pyname = pyname
        self.params = params
        self.ret = ret
        self.blocks = blocks
        self.memo_slot = memo_slot
        self.main = pyname == "_main"
        self.lines: list[str] = []
        self.uniq = 0
        self.deep_breaks = False
        self.check()

    def check(self) -> None:
        """Only values this function made (Make*) are changed in place: never data, never a
        rule's value. In statement order a mutated local must hold a made value; inside a
        scan, a local assigned otherwise anywhere in the loop body is not mutated there."""
        def targets(st: dict, t: str) -> list[int]:
            out = [st["target"]] if isinstance(st.get("target"), int) else []
            if t == "CallStmt":
                out.append(st["result"])
            if t == "ScanStmt":
                out += [st["key"], st["value"]]
            return out

        def run(blocks: list, depth: int, outer: set[int]) -> set[int]:
            # A block may stop anywhere: what it made counts inside it only; what it
            # reassigned is no longer known to be made, outside it too.
            if depth > _MAX_DEPTH:
                raise PlanUnsupported(f"{self.name}: blocks nested {depth} deep")
            for block in blocks:
                fresh = set(outer)
                sure: set[int] = set()  # made before anything in this block could stop it
                stopped = False
                for s in block["stmts"]:
                    t, st = s["type"], s["stmt"]
                    if t in _MAKERS and not stopped:
                        sure.add(st["target"])
                    if t not in _MAKERS and t not in _NEVER_STOP:
                        stopped = True
                    if t == "BreakStmt" and st["index"] > 0:
                        self.deep_breaks = True
                    if t in _MUTATORS and st[_MUTATORS[t]] not in fresh:
                        raise PlanUnsupported(f"{self.name}: local {st[_MUTATORS[t]]} is changed in place "
                                              "but may not hold a value made here")
                    for local in targets(st, t):
                        if t in _MAKERS:
                            fresh.add(local)
                        else:
                            fresh.discard(local)
                    if t == "BlockStmt":
                        fresh = run(st["blocks"], depth + 1, fresh)
                    elif t == "NotStmt":
                        fresh = run([st["block"]], depth + 1, fresh)
                    elif t == "ScanStmt":
                        other: set[int] = set()
                        mutated: set[int] = set()

                        def look(s2: dict, _d: int) -> None:
                            t2, st2 = s2["type"], s2["stmt"]
                            if t2 in _MUTATORS:
                                mutated.add(st2[_MUTATORS[t2]])
                            if t2 not in _MAKERS:
                                other.update(targets(st2, t2))
                        _walk([st["block"]], look)
                        if mutated & other:
                            raise PlanUnsupported(f"{self.name}: a local is reassigned and changed in one loop")
                        fresh = run([st["block"]], depth + 1, fresh)
                outer = (outer | sure) & fresh
            return outer
        run(self.blocks, 0, set())

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def operand(self, op: dict) -> str:
        t = op["type"]
        if t == "local":
            return f"l{op['value']}"
        if t == "bool":
            return "True" if op["value"] else "False"
        if t == "string_index":
            return repr(self.comp.strings[op["value"]])
        raise PlanUnsupported(f"{self.name}: operand type {t}")

    def source(self) -> str:
        args = ", ".join([f"l{p}" for p in self.params] + ["_C"])
        self.emit(0, f"def {self.pyname}({args}):")
        if self.main:
            self.emit(1, "_R = []")
        if self.memo_slot is not None:
            self.emit(1, f"r = _C[{self.memo_slot}]")
            self.emit(1, "if r is not _M:")
            self.emit(2, "return r")
        # Locals a statement may read before any assignment: undefined to begin with.
        seen: set[int] = set()

        def collect(s: dict, depth: int) -> None:
            st = s["stmt"]
            for key in ("target", "source", "result", "key", "value", "array", "object", "set"):
                v = st.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    seen.add(v)
                elif isinstance(v, dict) and v.get("type") == "local":
                    seen.add(v["value"])
            for a in st.get("args") or ():
                if a.get("type") == "local":
                    seen.add(a["value"])
            for k in ("a", "b"):
                v = st.get(k)
                if isinstance(v, dict) and v.get("type") == "local":
                    seen.add(v["value"])
        _walk(self.blocks, collect)
        if self.ret is not None:
            seen.add(self.ret)
        init = sorted(seen - set(self.params))
        if init:
            self.emit(1, " = ".join(f"l{n}" for n in init) + " = U")
        if self.deep_breaks:
            self.emit(1, "_b = 0")
        for block in self.blocks:
            self.block(block, 1)
        self.ret_line(1, "_R" if self.main else f"l{self.ret}" if self.ret is not None else "U")
        return "\n".join(self.lines)

    def ret_line(self, d: int, value: str) -> None:
        if self.memo_slot is not None:
            self.emit(d, f"_C[{self.memo_slot}] = {value}")
        self.emit(d, f"return {value}")

    def pass_breaks(self, d: int, loop_exit: bool = False) -> None:
        """After a nested block: carry a multi-level break outwards."""
        if self.deep_breaks:
            if loop_exit:
                self.emit(d, "if _b:")
                self.emit(d + 1, "break")
            else:
                self.emit(d, "if _b:")
                self.emit(d + 1, "_b -= 1")
                self.emit(d + 1, "break")

    def block(self, block: dict, d: int, *, completed: str | None = None) -> None:
        self.emit(d, "while True:")
        for s in block["stmts"]:
            self.stmt(s, d + 1)
        if completed:
            self.emit(d + 1, f"{completed} = True")
        self.emit(d + 1, "break")

    def fail_if(self, d: int, cond: str) -> None:
        self.emit(d, f"if {cond}:")
        self.emit(d + 1, "break")

    def stmt(self, s: dict, d: int) -> None:
        t, st = s["type"], s["stmt"]
        op = self.operand
        if t == "AssignVarStmt":
            self.emit(d, f"l{st['target']} = {op(st['source'])}")
        elif t == "AssignVarOnceStmt":
            tgt, src = f"l{st['target']}", op(st["source"])
            self.emit(d, f"if {tgt} is U:")
            self.emit(d + 1, f"{tgt} = {src}")
            self.emit(d, f"elif not eq({tgt}, {src}):")
            self.emit(d + 1, "conflict()")
        elif t == "CallStmt":
            name = st["func"]
            args = [op(a) for a in st["args"]]
            res = f"l{st['result']}"
            if name in self.comp.funcs:
                self.emit(d, f"{res} = {self.comp.funcs[name]}({', '.join(args + ['_C'])})")
                self.fail_if(d, f"{res} is U")
            elif name in rt.BUILTINS and name in self.comp.builtins:
                self.emit(d, f"{res} = {self.comp.builtin_name(name)}({', '.join(args)})")
            else:
                raise PlanUnsupported(f"{self.name}: builtin {name} is not supported by the compiled path")
        elif t == "DotStmt":
            src, key, tgt = op(st["source"]), op(st["key"]), f"l{st['target']}"
            if st["key"]["type"] == "string_index":
                self.emit(d, f"{tgt} = {src}.get({key}, U) if {src}.__class__ is dict else dot({src}, {key})")
            else:
                self.emit(d, f"{tgt} = dot({src}, {key})")
            self.fail_if(d, f"{tgt} is U")
        elif t in ("EqualStmt", "NotEqualStmt"):
            a, b = st["a"], st["b"]
            neg = t == "EqualStmt"
            if b["type"] == "bool" or a["type"] == "bool":
                x, lit = (a, b) if b["type"] == "bool" else (b, a)
                cond = f"{op(x)} is {'not ' if neg else ''}{op(lit)}"
            elif b["type"] == "string_index" or a["type"] == "string_index":
                cond = f"{op(a)} {'!=' if neg else '=='} {op(b)}"
            else:
                cond = f"{'not ' if neg else ''}eq({op(a)}, {op(b)})"
            self.fail_if(d, cond)
        elif t == "IsDefinedStmt":
            self.fail_if(d, f"l{st['source']} is U")
        elif t == "IsUndefinedStmt":
            self.fail_if(d, f"l{st['source']} is not U")
        elif t == "IsObjectStmt":
            self.fail_if(d, f"{op(st['source'])}.__class__ is not dict")
        elif t == "IsArrayStmt":
            self.fail_if(d, f"{op(st['source'])}.__class__ is not list")
        elif t == "IsSetStmt":
            self.fail_if(d, f"{op(st['source'])}.__class__ is not set")
        elif t == "ResetLocalStmt":
            self.emit(d, f"l{st['target']} = U")
        elif t == "MakeArrayStmt":
            self.emit(d, f"l{st['target']} = []")
        elif t == "MakeObjectStmt":
            self.emit(d, f"l{st['target']} = {{}}")
        elif t == "MakeSetStmt":
            self.emit(d, f"l{st['target']} = set()")
        elif t == "MakeNullStmt":
            self.emit(d, f"l{st['target']} = None")
        elif t == "MakeNumberIntStmt":
            self.emit(d, f"l{st['target']} = {int(st['value'])!r}")
        elif t == "MakeNumberRefStmt":
            text = self.comp.strings[st.get("Index", st.get("index"))]
            try:
                num: Any = int(text)
            except ValueError:
                try:
                    num = float(text)
                except ValueError:
                    raise PlanUnsupported(f"{self.name}: number {text!r}") from None
                if num != num or num in (float("inf"), float("-inf")):
                    raise PlanUnsupported(f"{self.name}: number {text!r}")
            self.emit(d, f"l{st['target']} = {num!r}")
        elif t == "ArrayAppendStmt":
            self.emit(d, f"l{st['array']}.append({op(st['value'])})")
        elif t == "ObjectInsertStmt":
            if st["key"]["type"] == "string_index":
                self.emit(d, f"l{st['object']}[{op(st['key'])}] = {op(st['value'])}")
            else:
                self.emit(d, f"oinsert(l{st['object']}, {op(st['key'])}, {op(st['value'])})")
        elif t == "ObjectInsertOnceStmt":
            self.emit(d, f"oinsert_once(l{st['object']}, {op(st['key'])}, {op(st['value'])})")
        elif t == "SetAddStmt":
            if st["value"]["type"] == "string_index":
                self.emit(d, f"l{st['set']}.add({op(st['value'])})")
            else:
                self.emit(d, f"sadd(l{st['set']}, {op(st['value'])})")
        elif t == "LenStmt":
            self.emit(d, f"l{st['target']} = length({op(st['source'])})")
        elif t == "ReturnLocalStmt":
            self.ret_line(d, f"l{st['source']}")
        elif t == "ResultSetAddStmt":
            self.emit(d, f"_R.append(l{st['value']})")
        elif t == "BreakStmt":
            if st["index"] > 0:
                self.emit(d, f"_b = {int(st['index'])}")
            self.emit(d, "break")
        elif t == "BlockStmt":
            for block in st["blocks"]:
                self.block(block, d)
                self.pass_breaks(d)
        elif t == "NotStmt":
            self.uniq += 1
            flag = f"_n{self.uniq}"
            self.emit(d, f"{flag} = False")
            self.block(st["block"], d, completed=flag)
            self.pass_breaks(d)
            self.fail_if(d, flag)
        elif t == "ScanStmt":
            self.emit(d, f"for l{st['key']}, l{st['value']} in scan(l{st['source']}):")
            self.block(st["block"], d + 1)
            self.pass_breaks(d + 1, loop_exit=True)
            self.pass_breaks(d)
        elif t == "NopStmt":
            pass
        else:
            raise PlanUnsupported(f"{self.name}: statement {t} is not supported by the compiled path")


class Compiler:
    def __init__(self, plan: dict) -> None:
        self.plan = plan
        static = plan.get("static") or {}
        self.strings = [s["value"] for s in static.get("strings") or ()]
        self.builtins = {b["name"] for b in static.get("builtin_funcs") or ()}
        self.funcs: dict[str, str] = {}
        self.used_builtins: dict[str, str] = {}

    def builtin_name(self, name: str) -> str:
        py = "b_" + name.replace(".", "_")
        self.used_builtins[name] = py
        return py

    def compile(self, entry: str) -> tuple[str, dict]:
        """(Python source, namespace to exec it in); ``ev(input, data) -> [result, ...]``."""
        for name in self.builtins:
            if name not in rt.BUILTINS:
                raise PlanUnsupported(f"builtin {name} is not supported by the compiled path")
        funcs = (self.plan.get("funcs") or {}).get("funcs") or []
        for i, f in enumerate(funcs):
            self.funcs[f["name"]] = f"f{i}"
        out = []
        slots = 0
        for i, f in enumerate(funcs):
            memo = None
            if len(f["params"]) == 2:  # a rule of input and data only: one value per evaluation
                memo, slots = slots, slots + 1
            out.append(_Func(self, f["name"], f"f{i}", f["params"], f.get("return"), f["blocks"], memo).source())
        plans = [p for p in (self.plan.get("plans") or {}).get("plans") or [] if p["name"] == entry]
        if len(plans) != 1:
            raise PlanUnsupported(f"the plan has no entry point {entry}")
        main = _Func(self, entry, "_main", [0, 1], None, plans[0]["blocks"], None)
        main_src = main.source()
        src = "\n\n".join(out + [main_src])
        src += (
            "\n\n"
            f"_FRESH = [_M] * {slots}\n"
            "def ev(inp, data):\n"
            "    return _main(inp, data, _FRESH.copy())\n"
        )
        ns: dict[str, Any] = {
            "U": rt.U, "_M": object(), "eq": rt.eq, "dot": rt.dot, "scan": rt.scan, "oinsert": rt.oinsert,
            "oinsert_once": rt.oinsert_once, "sadd": rt.sadd, "length": rt.length, "conflict": rt.conflict,
        }
        for name, py in self.used_builtins.items():
            ns[py] = rt.BUILTINS[name]
        return src, ns


def compile_plan(plan: dict, entry: str) -> tuple[Any, str]:
    """(``ev(input, data) -> list of results``, its Python source)."""
    src, ns = Compiler(plan).compile(entry)
    try:
        code = compile(src, "<regate-plan>", "exec")
    except (SyntaxError, RecursionError) as exc:
        raise PlanUnsupported(f"the generated code does not compile: {exc}") from None
    exec(code, ns)  # noqa: S102 - our own generated source, from OPA's plan
    return ns["ev"], src
