"""The policy bundle: Rego modules plus the data they read, and its revision.

A bundle is every ``*.rego`` file under the rego dir (recursively, sorted;
``*_test.rego`` only when tests are asked for) and every ``.yaml``/``.yml``/
``.json`` file under the data dir, mounted under ``data`` by its path without
the extension: ``policies/agents.yaml`` is ``data.agents``,
``policies/x/y.yaml`` is ``data.x.y``. That is the shape OPA gives a bundle, so
the same directories can be loaded into an OPA server unchanged.

The revision is a short content hash of the modules and data files that take
part in decisions (tests excluded), so every decision can be tied to the exact
policy that made it. Every problem is reported as ``file:line: message``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import orjson
import yaml

try:  # the C loader is several times faster on large agent lists
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - pyyaml built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]


DATA_SUFFIXES = (".yaml", ".yml", ".json")


class BundleError(Exception):
    """A bundle that cannot be loaded; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Module:
    """One Rego source file: the name errors use, and its text."""

    __slots__ = ("name", "source", "is_test")

    def __init__(self, name: str, source: str, *, is_test: bool = False) -> None:
        self.name = name
        self.source = source
        self.is_test = is_test

    def __repr__(self) -> str:
        return f"Module({self.name!r})"


class Bundle:
    """Modules, the merged data document (also as JSON) and the revision."""

    __slots__ = ("modules", "data", "data_json", "revision", "rego_dir", "data_dir")

    def __init__(self, modules: list[Module], data: dict[str, Any], *, revision: str | None = None,
                 rego_dir: Path | None = None, data_dir: Path | None = None) -> None:
        self.modules = modules
        self.data = data
        self.data_json = orjson.dumps(data).decode()
        self.revision = revision or _hash_sources(
            [(m.name, m.source.encode()) for m in modules if not m.is_test],
            [("data.json", self.data_json.encode())],
        )
        self.rego_dir = rego_dir
        self.data_dir = data_dir

    @classmethod
    def from_sources(cls, modules: dict[str, str], data: dict[str, Any] | None = None) -> "Bundle":
        """A bundle from memory (policy eval of a snippet, the conformance tests)."""
        mods = [Module(name, src, is_test=name.endswith("_test.rego")) for name, src in sorted(modules.items())]
        return cls(mods, _jsonable(data or {}, "<data>"))


def display_path(path: Path) -> str:
    """A path as a user wants to read it: relative to the working dir when under it."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(rel)


def _walk(root: Path, keep) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Hidden directories (.git, editor state) are never part of a bundle.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and keep(name):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def rego_files(rego_dir: Path, *, include_tests: bool = False) -> list[Path]:
    return _walk(rego_dir, lambda n: n.endswith(".rego") and (include_tests or not n.endswith("_test.rego")))


def data_files(data_dir: Path) -> list[Path]:
    return _walk(data_dir, lambda n: n.endswith(DATA_SUFFIXES))


def _hash_sources(rego: list[tuple[str, bytes]], data: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for kind, files in (("rego", rego), ("data", data)):
        for name, content in sorted(files):
            # Length-prefixed, so no two different bundles hash the same stream.
            for part in (kind.encode(), name.encode(), content):
                h.update(len(part).to_bytes(8, "big"))
                h.update(part)
    return "sha256:" + h.hexdigest()[:12]


def _jsonable(value: Any, where: str) -> Any:
    """YAML gives dates, int keys and the like; data must be plain JSON values."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(f"{where}: {value} is not a JSON number")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool):
                key = "true" if k else "false"
            elif isinstance(k, (int, float, str)):
                key = str(k)
            elif k is None:
                key = "null"
            else:
                raise BundleError(f"{where}: key {k!r} is not a string")
            out[key] = _jsonable(v, where)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        # As OPA reads YAML: a timestamp is a string.
        return value.isoformat()
    raise BundleError(f"{where}: value of type {type(value).__name__} cannot be policy data")


def parse_data_file(path: Path, raw: bytes) -> Any:
    name = display_path(path)
    if path.suffix == ".json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BundleError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    try:
        value = yaml.load(raw, Loader=_YamlLoader)  # noqa: S506 - the safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise BundleError(f"{where}: not valid YAML ({problem})") from None
    # An empty file is an empty document, not null: `agents.yaml` with every
    # agent commented out still means "no agents".
    return {} if value is None else _jsonable(value, name)


def mount_path(data_dir: Path, path: Path) -> list[str]:
    rel = path.relative_to(data_dir)
    return [*rel.parent.parts, rel.name[: -len(path.suffix)]]


def load_bundle(rego_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None, *,
                include_tests: bool = False) -> Bundle:
    """Read a bundle from disk; raise BundleError naming every file that is wrong."""
    rdir = Path(rego_dir)
    if not rdir.is_dir():
        raise BundleError(f"{display_path(rdir)}: rego directory does not exist (policy.rego in regate.yaml)")
    paths = rego_files(rdir, include_tests=include_tests)
    if not any(not p.name.endswith("_test.rego") for p in paths):
        raise BundleError(f"{display_path(rdir)}: no .rego files found (policy.rego in regate.yaml)")
    problems: list[str] = []
    modules: list[Module] = []
    rego_hash: list[tuple[str, bytes]] = []
    for p in paths:
        try:
            raw = p.read_bytes()
            src = raw.decode("utf-8")
        except OSError as exc:
            problems.append(f"{display_path(p)}: cannot read ({exc.strerror})")
            continue
        except UnicodeDecodeError as exc:
            problems.append(f"{display_path(p)}: not UTF-8 text (byte {exc.start})")
            continue
        is_test = p.name.endswith("_test.rego")
        modules.append(Module(display_path(p), src, is_test=is_test))
        if not is_test:
            rego_hash.append((p.relative_to(rdir).as_posix(), raw))

    data: dict[str, Any] = {}
    data_hash: list[tuple[str, bytes]] = []
    origins: dict[tuple[str, ...], str] = {}
    if data_dir is not None:
        ddir = Path(data_dir)
        if not ddir.is_dir():
            problems.append(f"{display_path(ddir)}: data directory does not exist (policy.data in regate.yaml)")
        else:
            for p in data_files(ddir):
                try:
                    raw = p.read_bytes()
                    value = parse_data_file(p, raw)
                except OSError as exc:
                    problems.append(f"{display_path(p)}: cannot read ({exc.strerror})")
                    continue
                except BundleError as exc:
                    problems.extend(exc.problems)
                    continue
                data_hash.append((p.relative_to(ddir).as_posix(), raw))
                try:
                    _mount(data, mount_path(ddir, p), value, display_path(p), origins)
                except BundleError as exc:
                    problems.extend(exc.problems)
    if problems:
        raise BundleError(problems)
    return Bundle(modules, data, revision=_hash_sources(rego_hash, data_hash),
                  rego_dir=rdir, data_dir=Path(data_dir) if data_dir is not None else None)


def _mount(root: dict[str, Any], keys: list[str], value: Any, name: str,
           origins: dict[tuple[str, ...], str]) -> None:
    node = root
    for i, key in enumerate(keys[:-1]):
        here = tuple(keys[: i + 1])
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise BundleError(f"{name}: data.{'.'.join(here)} is already set by {origins.get(here, '?')}")
        node = child
    last = keys[-1]
    here = tuple(keys)
    if last in node:
        existing = node[last]
        if isinstance(existing, dict) and isinstance(value, dict):
            # x.yaml beside a directory x/: both are parts of data.x.
            clash = sorted(set(existing) & set(value))
            if clash:
                other = origins.get(here + (clash[0],), origins.get(here, "another file"))
                raise BundleError(f"{name}: data.{'.'.join(here + (clash[0],))} is already set by {other}")
            existing.update(value)
            return
        raise BundleError(f"{name}: data.{'.'.join(here)} is already set by {origins.get(here, 'another file')}")
    node[last] = value
    origins[here] = name
