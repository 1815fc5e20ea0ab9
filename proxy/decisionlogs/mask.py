"""Masking decision-log events before they leave: OPA's `system.log.mask` rules,
given statically in regate.yaml.

A rule is a JSON Pointer (RFC 6901: `~1` is `/`, `~0` is `~`) into the event,
under `/input` or `/result`: a plain string removes what it points at; the
object form `{"op": "upsert", "path": ..., "value": ...}` sets a value there,
creating objects on the way (OPA's upsert). A pointer to nothing is ignored.
Masking never changes the documents it is given: the containers on a rule's
path are copied (copy-on-write), everything else is shared, because the input
and the decision are the very objects the engine saw, still referenced by the
call, its trace and the audit.
"""

from __future__ import annotations

from typing import Any

ROOTS = ("input", "result")


class MaskError(ValueError):
    """A mask rule that cannot be used; the message says which and why."""


def parse_pointer(pointer: str) -> list[str]:
    """`/input/a~1b/c~0d` → ['input', 'a/b', 'c~d'] (RFC 6901 unescaping)."""
    if not isinstance(pointer, str) or not pointer.startswith("/"):
        raise MaskError(f"{pointer!r}: a mask is a JSON pointer starting with '/', "
                        "like /input/request/headers/x-secret")
    parts = []
    for raw in pointer[1:].split("/"):
        # Any "~" not followed by 0 or 1 is an error in RFC 6901.
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise MaskError(f"{pointer!r}: '~' must be written ~0 and '/' inside a key ~1")
        parts.append(raw.replace("~1", "/").replace("~0", "~"))
    if parts[0] not in ROOTS:
        raise MaskError(f"{pointer!r}: a mask points into /input or /result, not /{parts[0]}")
    return parts


def format_pointer(parts: list[str]) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class MaskRule:
    __slots__ = ("op", "parts", "pointer", "value")

    def __init__(self, op: str, pointer: str, value: Any = None) -> None:
        if op not in ("remove", "upsert"):
            raise MaskError(f"mask op {op!r}: want remove or upsert")
        self.op = op
        self.parts = parse_pointer(pointer)
        self.pointer = format_pointer(self.parts)
        self.value = value

    def __repr__(self) -> str:
        return f"MaskRule({self.op!r}, {self.pointer!r})"


def parse_rules(items: list[Any]) -> list[MaskRule]:
    """The `decision_logs.mask` list: pointers (remove) or {op, path, value} objects."""
    rules = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, str):
                rules.append(MaskRule("remove", item))
            elif isinstance(item, dict):
                extra = set(item) - {"op", "path", "value"}
                if extra or "path" not in item:
                    raise MaskError(f"a mask object has path, op (remove | upsert) and value, got keys {sorted(item)}")
                op = item.get("op", "remove")
                if op == "upsert" and "value" not in item:
                    raise MaskError("an upsert needs a value")
                rules.append(MaskRule(op, item["path"], item.get("value")))
            else:
                raise MaskError(f"a mask is a JSON pointer string or an {{op, path, value}} object, got {item!r}")
        except MaskError as exc:
            raise MaskError(f"[{i}]: {exc}") from None
    return rules


def _index(key: str, size: int) -> int | None:
    if not key.isdigit() or (len(key) > 1 and key[0] == "0"):
        return None
    i = int(key)
    return i if i < size else None


class _Masker:
    """Applies rules to one event; `mine` holds the ids of containers already copied for it."""

    __slots__ = ("event", "mine")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self.mine: set[int] = set()

    def _own(self, container: Any) -> Any:
        if id(container) in self.mine:
            return container
        copy = dict(container) if isinstance(container, dict) else list(container)
        self.mine.add(id(copy))
        return copy

    def _walk(self, parts: list[str], create: bool) -> tuple[Any, str] | None:
        """The (owned) parent container of the pointer's last part, copying on the way."""
        node = self.event
        for key in parts[:-1]:
            if isinstance(node, dict):
                child = node.get(key)
                if not isinstance(child, (dict, list)):
                    if not create or key in node and child is not None:
                        return None
                    child = {}
                    self.mine.add(id(child))
                else:
                    child = self._own(child)
                node[key] = child
            elif isinstance(node, list):
                i = _index(key, len(node))
                if i is None or not isinstance(node[i], (dict, list)):
                    return None
                node[i] = child = self._own(node[i])
            else:
                return None
            node = child
        return node, parts[-1]

    def apply(self, rule: MaskRule) -> bool:
        """True when the rule changed the event."""
        root = rule.parts[0]
        if root not in self.event:
            return False  # no input or no result: nothing to mask
        found = self._walk(rule.parts, create=rule.op == "upsert")
        if found is None:
            return False
        parent, key = found
        if isinstance(parent, dict):
            if rule.op == "remove":
                if key not in parent:
                    return False
                del parent[key]
            else:
                parent[key] = rule.value
            return True
        if isinstance(parent, list):
            i = _index(key, len(parent))
            if i is None:
                return False
            if rule.op == "remove":
                del parent[i]
            else:
                parent[i] = rule.value
            return True
        return False


def apply_mask(event: dict[str, Any], rules: list[MaskRule]) -> dict[str, Any]:
    """The event with the rules applied, `erased` / `masked` listing what they changed.

    `event` itself is a fresh dict (the caller's); the documents under it are not
    modified, only copied along each rule's path.
    """
    if not rules:
        return event
    m = _Masker(event)
    m.mine.add(id(event))
    erased: list[str] = []
    masked: list[str] = []
    for rule in rules:
        if m.apply(rule):
            (erased if rule.op == "remove" else masked).append(rule.pointer)
    if erased:
        event["erased"] = erased
    if masked:
        event["masked"] = masked
    return event
