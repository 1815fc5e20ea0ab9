"""What the generated code calls: Rego values, equality, and the builtins it supports.

Values are what ``orjson.loads`` makes (None, bool, int, float, str, list, dict)
plus ``set`` for Rego sets. Sets hold strings only, objects have string keys only:
anything else raises ``Unsupported`` and that input is decided by regorus. Every
builtin is strict: an argument of a type it does not expect (where OPA would
report an error or an undefined, and regorus may differ) raises ``Unsupported``
rather than guess. Regular expressions go through RE2, never Python's ``re``.
"""

from __future__ import annotations

from typing import Any

import re2


class Unsupported(Exception):
    """This input needs something the compiled path does not do: regorus decides it."""


class _Undef:
    __slots__ = ()

    def __repr__(self) -> str:
        return "U"


#: An undefined local (Rego's undefined; None is Rego's null).
U: Any = _Undef()

_NUM = (int, float)


def eq(a: Any, b: Any) -> bool:
    """Rego equality: 1 == 1.0, true != 1, deep over arrays, objects and sets."""
    ta = a.__class__
    tb = b.__class__
    if ta is tb:
        if ta is list:
            return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
        if ta is dict:
            if len(a) != len(b):
                return False
            for k, v in a.items():
                w = b.get(k, U)
                if w is U or not eq(v, w):
                    return False
            return True
        return a == b  # str, int, float, bool, None, set of str
    if ta in _NUM and tb in _NUM:
        return a == b
    return False


def dot(src: Any, key: Any) -> Any:
    """``src[key]``, or U."""
    t = src.__class__
    if t is dict:
        if key.__class__ is str:
            return src.get(key, U)
        return U  # objects here have string keys only
    if t is list:
        if key.__class__ is int:
            return src[key] if 0 <= key < len(src) else U
        if key.__class__ is float:
            raise Unsupported("array index is a float")
        return U
    if t is set:
        if key.__class__ is str:
            return key if key in src else U
        return U  # sets here hold strings only
    return U


def scan(src: Any) -> Any:
    """(key, value) pairs, in OPA's order (objects and sets sorted)."""
    t = src.__class__
    if t is list:
        return enumerate(src)
    if t is dict:
        return sorted(src.items())
    if t is set:
        return [(x, x) for x in sorted(src)]
    # OPA: no iteration (undefined); regorus: an error. Hand it over, keep regorus's answer.
    raise Unsupported("iteration over a scalar")


def oinsert(obj: dict, key: Any, value: Any) -> None:
    if key.__class__ is not str:
        raise Unsupported("object key is not a string")
    obj[key] = value


def oinsert_once(obj: dict, key: Any, value: Any) -> None:
    if key.__class__ is not str:
        raise Unsupported("object key is not a string")
    old = obj.get(key, U)
    if old is not U and not eq(old, value):
        raise Unsupported("object insert conflict")
    obj[key] = value


def sadd(s: set, value: Any) -> None:
    if value.__class__ is not str:
        raise Unsupported("set element is not a string")
    s.add(value)


def length(x: Any) -> int:
    if x.__class__ in (str, list, dict, set):
        return len(x)
    raise Unsupported("length of a scalar")


def conflict() -> None:
    raise Unsupported("conflicting values for one rule (OPA: eval_conflict_error)")


def set_default(x: Any) -> Any:
    """orjson's ``default``: a set as its sorted array (as regorus writes it)."""
    if x.__class__ is set:
        return sorted(x)
    raise TypeError(type(x).__name__)


# --- Builtins ------------------------------------------------------------------


def _str(x: Any) -> str:
    if x.__class__ is not str:
        raise Unsupported("string operand expected")
    return x


def _int(x: Any) -> int:
    if x.__class__ is not int:
        raise Unsupported("integer operand expected")
    return x


def b_count(x: Any) -> int:
    return length(x)


def b_equal(a: Any, b: Any) -> bool:
    return eq(a, b)


def b_neq(a: Any, b: Any) -> bool:
    return not eq(a, b)


def b_gt(a: Any, b: Any) -> bool:
    ta, tb = a.__class__, b.__class__
    if (ta in _NUM and tb in _NUM) or (ta is str and tb is str):
        return a > b
    raise Unsupported("comparison across types")


def b_is_number(x: Any) -> bool:
    return x.__class__ in _NUM


def b_is_string(x: Any) -> bool:
    return x.__class__ is str


def b_is_object(x: Any) -> bool:
    return x.__class__ is dict


def b_member_2(x: Any, coll: Any) -> bool:
    t = coll.__class__
    if t is list:
        return any(eq(x, e) for e in coll)
    if t is set:
        return x.__class__ is str and x in coll
    if t is dict:
        return any(eq(x, v) for v in coll.values())
    raise Unsupported("membership in a scalar")


def b_concat(delim: Any, coll: Any) -> str:
    _str(delim)
    t = coll.__class__
    if t is set:
        items = sorted(coll)
    elif t is list:
        items = coll
        for e in items:
            if e.__class__ is not str:
                raise Unsupported("concat of a non-string")
    else:
        raise Unsupported("concat of a non-collection")
    return delim.join(items)


def b_contains(s: Any, sub: Any) -> bool:
    return _str(sub) in _str(s)


def b_startswith(s: Any, prefix: Any) -> bool:
    return _str(s).startswith(_str(prefix))


def b_trim_prefix(s: Any, prefix: Any) -> str:
    return _str(s).removeprefix(_str(prefix))


def b_lower(s: Any) -> str:
    if not _str(s).isascii():
        raise Unsupported("lower of non-ASCII text (Go, Rust and Python case tables differ)")
    return s.lower()


def b_split(s: Any, delim: Any) -> list:
    if not _str(delim):
        raise Unsupported("split on an empty delimiter")
    return _str(s).split(delim)


def b_replace(s: Any, old: Any, new: Any) -> str:
    if not _str(old):
        raise Unsupported("replace of an empty string")
    return _str(s).replace(old, _str(new))


def b_sort(coll: Any) -> list:
    t = coll.__class__
    if t not in (list, set):
        raise Unsupported("sort of a non-collection")
    if all(e.__class__ is str for e in coll):
        return sorted(coll)
    raise Unsupported("sort of non-strings")


def b_array_slice(arr: Any, start: Any, stop: Any) -> list:
    if arr.__class__ is not list:
        raise Unsupported("array.slice of a non-array")
    start, stop = _int(start), _int(stop)
    return arr[max(start, 0):max(stop, 0)]


def b_object_get(obj: Any, key: Any, default: Any) -> Any:
    if obj.__class__ is not dict:
        raise Unsupported("object.get of a non-object")
    if key.__class__ is str:
        return obj.get(key, default)
    if key.__class__ in (list, dict, set):
        raise Unsupported("object.get with a path or composite key")
    return default


def b_object_filter(obj: Any, keys: Any) -> dict:
    if obj.__class__ is not dict:
        raise Unsupported("object.filter of a non-object")
    t = keys.__class__
    if t not in (list, set, dict):
        raise Unsupported("object.filter keys of a scalar")
    out = {}
    for k in keys:
        if k.__class__ is str:
            v = obj.get(k, U)
            if v is not U:
                out[k] = v
        elif k.__class__ in (list, dict, set):
            raise Unsupported("object.filter with a composite key")
    return out


def b_sprintf(fmt: Any, args: Any) -> str:
    """%s (strings), %v (strings, integers), %d (integers), %%; anything else: Unsupported."""
    _str(fmt)
    if args.__class__ is not list:
        raise Unsupported("sprintf arguments are not an array")
    out = []
    i = 0
    n = len(fmt)
    ai = 0
    while True:
        j = fmt.find("%", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        if j + 1 >= n:
            raise Unsupported("sprintf: a lone % at the end")
        c = fmt[j + 1]
        i = j + 2
        if c == "%":
            out.append("%")
            continue
        if ai >= len(args):
            raise Unsupported("sprintf: too few arguments")
        a = args[ai]
        ai += 1
        t = a.__class__
        if c == "s" and t is str:
            out.append(a)
        elif c == "v" and t is str:
            out.append(a)
        elif c in "vd" and t is int:
            out.append(str(a))
        elif c in "sv" and a is None:
            out.append("null")
        elif c in "sv" and t is bool:
            out.append("true" if a else "false")
        else:
            raise Unsupported(f"sprintf: %{c} of a {t.__name__}")
    if ai != len(args):
        raise Unsupported("sprintf: extra arguments")
    return "".join(out)


_REGEX_CACHE: dict[str, Any] = {}
_PERL_CLASSES = frozenset("sSwWdDbBpPX")


def _regex(pattern: Any) -> Any:
    r = _REGEX_CACHE.get(pattern)
    if r is None:
        _str(pattern)
        # \s \w \d \b and Unicode classes differ between RE2 (ASCII) and regorus (Unicode).
        i = pattern.find("\\")
        while i >= 0:
            if i + 1 < len(pattern) and pattern[i + 1] in _PERL_CLASSES:
                raise Unsupported("a Perl or Unicode character class in a regex")
            i = pattern.find("\\", i + 2)
        if pattern.replace("(?:", "").find("(?") >= 0:
            raise Unsupported("regex flags or named groups")
        try:
            r = re2.compile(pattern)
        except Exception as exc:  # noqa: BLE001 - re2.error: the pattern is refused
            raise Unsupported(f"regex does not compile: {exc}") from None
        if len(_REGEX_CACHE) > 1024:
            _REGEX_CACHE.clear()
        _REGEX_CACHE[pattern] = r
    return r


def b_regex_match(pattern: Any, value: Any) -> bool:
    return _regex(pattern).search(_str(value)) is not None


def b_regex_find_n(pattern: Any, value: Any, n: Any) -> list:
    r = _regex(pattern)
    _str(value)
    n = _int(n)
    out = []
    if n == 0:
        return out
    for m in r.finditer(value):
        g = m.group(0)
        if not g:
            raise Unsupported("regex.find_n with an empty match")
        out.append(g)
        if len(out) == n:
            break
    return out


#: OPA builtin name -> the function here (the only builtins a compiled plan may call).
BUILTINS = {
    "array.slice": b_array_slice,
    "concat": b_concat,
    "contains": b_contains,
    "count": b_count,
    "equal": b_equal,
    "gt": b_gt,
    "internal.member_2": b_member_2,
    "is_number": b_is_number,
    "is_object": b_is_object,
    "is_string": b_is_string,
    "lower": b_lower,
    "neq": b_neq,
    "object.filter": b_object_filter,
    "object.get": b_object_get,
    "regex.find_n": b_regex_find_n,
    "regex.match": b_regex_match,
    "replace": b_replace,
    "sort": b_sort,
    "split": b_split,
    "sprintf": b_sprintf,
    "startswith": b_startswith,
    "trim_prefix": b_trim_prefix,
}
