"""The policy bundle: Rego modules plus the data they read, and its revision.

A bundle is laid out exactly as an OPA bundle, so ``opa run``, ``opa test``,
``opa build`` and Regate all see the same ``data``:

- every ``*.rego`` file is a module (``*_test.rego`` only when tests are asked
  for);
- data comes only from files named ``data.json``, ``data.yaml`` or
  ``data.yml``, mounted at the directory they sit in: ``policies/agents/data.yaml``
  is ``data.agents``, ``policies/data.json`` is ``data`` itself (an object);
  files are merged as OPA merges them, key by key where both sides are objects,
  and anything else set twice is a conflict naming both files;
- any other ``.json``/``.yaml``/``.yml`` file is refused with the path it must
  move to (OPA would ignore it inside a bundle and mount it at its directory
  outside one: either way not where its author meant).

Three sources: Regate's two directories (``policy.rego`` and ``policy.data``,
the two roots ``opa run rego/ policies/`` is given); a ``.tar.gz`` made by
``opa build``; a directory in OPA's bundle layout. The last two may carry a
``.manifest`` (``revision``, ``roots``, ``rego_version``) and a
``.signatures.json``, verified as OPA verifies it (``verify_signatures``).

The revision is the manifest's ``revision`` when there is one, else a short
content hash of the modules and data files that take part in decisions (tests
excluded), so every decision can be tied to the exact policy that made it.
Every problem is reported as ``file[:line]: message``.
"""

from __future__ import annotations

import decimal
import hashlib
import io
import json
import math
import os
import re
import struct
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
import yaml

try:  # the C parser is several times faster on large agent lists
    from yaml import CSafeLoader as _YamlBase
except ImportError:  # pragma: no cover - pyyaml built without libyaml
    from yaml import SafeLoader as _YamlBase  # type: ignore[assignment]


#: The only file names OPA reads data from inside a bundle.
DATA_FILES = ("data.json", "data.yaml", "data.yml")
#: Names that look like data but are not read as data by OPA's bundle reader.
_DATA_LIKE = (".json", ".yaml", ".yml")
MANIFEST = ".manifest"
SIGNATURES = ".signatures.json"
#: As OPA: no file of a bundle may be larger than 1 GiB (a gzip bomb stops here).
MAX_FILE_BYTES = 1 << 30
MAX_BUNDLE_BYTES = 1 << 30


class BundleError(Exception):
    """A bundle that cannot be loaded; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NoBundleYet(BundleError):
    """The source has no bundle to give yet: a bundle service that has not answered
    and no last good bundle on disk. Not a broken bundle: the engine starts unloaded."""


class Module:
    """One Rego source file: the name errors use, its text, and its Rego version."""

    __slots__ = ("name", "source", "is_test", "rego_v0")

    def __init__(self, name: str, source: str, *, is_test: bool = False, rego_v0: bool = False) -> None:
        self.name = name
        self.source = source
        self.is_test = is_test
        self.rego_v0 = rego_v0

    def __repr__(self) -> str:
        return f"Module({self.name!r})"


class Bundle:
    """Modules, the merged data document (also as JSON), the manifest and the revision.

    ``digest`` is always the content hash; ``revision`` is the manifest's
    revision when it has one (what OPA reports), else the digest. ``origins``
    maps a mount path (``("limits",)``) to the file that set it.
    """

    __slots__ = ("modules", "data", "data_json", "revision", "digest", "rego_dir", "data_dir", "manifest",
                 "roots", "source", "origins")

    def __init__(self, modules: list[Module], data: dict[str, Any], *, revision: str | None = None,
                 rego_dir: Path | None = None, data_dir: Path | None = None, digest: str | None = None,
                 manifest: dict[str, Any] | None = None, source: str = "<memory>",
                 origins: dict[tuple[str, ...], str] | None = None) -> None:
        self.modules = modules
        self.data = data
        self.data_json = dumps_data(data)
        self.digest = digest or revision or _hash_sources(
            [(m.name, m.source.encode()) for m in modules if not m.is_test],
            [("data.json", self.data_json.encode())],
        )
        self.manifest = manifest or {}
        manifest_revision = self.manifest.get("revision")
        self.revision = manifest_revision if isinstance(manifest_revision, str) and manifest_revision else (
            revision or self.digest)
        roots = self.manifest.get("roots")
        self.roots: list[str] = [str(r).strip("/") for r in roots] if isinstance(roots, list) else [""]
        self.rego_dir = rego_dir
        self.data_dir = data_dir
        self.source = source
        self.origins = origins or {}

    @classmethod
    def from_sources(cls, modules: dict[str, str], data: dict[str, Any] | None = None) -> "Bundle":
        """A bundle from memory (policy eval of a snippet, the conformance tests)."""
        mods = [Module(name, src, is_test=name.endswith("_test.rego")) for name, src in sorted(modules.items())]
        return cls(mods, _jsonable(data or {}, "<data>"))

    def origin(self, *path: str) -> str:
        """The file that set ``data.<path>`` (or the nearest enclosing document)."""
        for n in range(len(path), -1, -1):
            name = self.origins.get(tuple(path[:n]))
            if name is not None:
                return name
        return self.source


def dumps_data(data: Any) -> str:
    """The data document as JSON (integers past 64 bits too, which orjson refuses)."""
    try:
        return orjson.dumps(data).decode()
    except TypeError:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


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
    """Every data-looking file: the ones OPA reads, and old-style ones to refuse."""
    return _walk(data_dir, lambda n: n.endswith(_DATA_LIKE))


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
    """Data must be plain JSON values (what a caller hands from_sources)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(f"{where}: {value} is not a JSON number")
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    raise BundleError(f"{where}: value of type {type(value).__name__} cannot be policy data")


# --- YAML as OPA reads it ------------------------------------------------------
#
# OPA converts YAML to JSON with sigs.k8s.io/yaml (go-yaml v2 underneath), whose
# plain scalars are not PyYAML's YAML 1.1: only true/false (any case of those
# two) are booleans (`yes`, `on`, `y` are strings), numbers are what Go's
# strconv parses once underscores are dropped (`0x1F`, `0o17`, `017`, `0b101`,
# `1e3`, `1_000`), timestamps and sexagesimals (`1:30`) stay strings. A float is
# what Go's JSON encoder prints for it, so an integral one is an integer.


class _OpaYamlLoader(_YamlBase):  # type: ignore[misc, valid-type]
    pass


_OpaYamlLoader.yaml_implicit_resolvers = {}
_OpaYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_OpaYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_OpaYamlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
_GO_NUMBER_TAG = "tag:regate,2026:go-number"
_OpaYamlLoader.add_implicit_resolver(_GO_NUMBER_TAG, re.compile(r"^[-+.0-9].*$", re.S), list("-+.0123456789"))

_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_GO_INT = re.compile(r"^[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_SPECIAL_FLOAT = re.compile(r"^[-+]?\.(inf|Inf|INF|nan|NaN|NAN)$")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64), then ParseUint: None when neither takes it."""
    if not _GO_INT.match(text):
        return None
    sign = -1 if text[0] == "-" else 1
    body = text.lstrip("+-")
    low = body[:2].lower()
    if low == "0x":
        n = int(body[2:], 16)
    elif low == "0o":
        n = int(body[2:], 8)
    elif low == "0b":
        n = int(body[2:], 2)
    elif body.startswith("0") and len(body) > 1:
        n = int(body[1:], 8)
    else:
        n = int(body)
    n *= sign
    if _INT64[0] <= n <= _INT64[1]:
        return n
    if 0 <= n < (1 << 64) and text[0] not in "+-":
        return n
    return None


def _json_float(x: float) -> int | float:
    """A float64 as it comes back from Go's JSON encoder: integral ones are integers."""
    if x.is_integer() and abs(x) < 1e21:
        return int(x)
    return x


def _go_number(loader: yaml.Loader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    if _SPECIAL_FLOAT.match(text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text} is not a JSON number (OPA refuses it too)", node.start_mark)
    plain = text.replace("_", "")
    n = _go_int(plain)
    if n is not None:
        return n
    if _YAML_FLOAT.match(plain):
        try:
            x = float(plain)
        except ValueError:
            return text
        if math.isfinite(x):
            return _json_float(x)
    return text  # a string after all: a date, 1:30, 12e ...


def _yaml_float_value(loader: yaml.Loader, node: yaml.ScalarNode) -> Any:  # an explicit !!float
    x = yaml.constructor.SafeConstructor.construct_yaml_float(loader, node)
    if not math.isfinite(x):
        raise yaml.constructor.ConstructorError(None, None, f"{x} is not a JSON number", node.start_mark)
    return _json_float(x)


def _yaml_mapping(loader: yaml.Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key_node.tag == _GO_NUMBER_TAG and isinstance(key, int) and not isinstance(key, bool):
            plain = key_node.value.replace("_", "")
            if _go_int(plain) is None:  # a float key that happens to be integral (1e7, 2.0)
                key = float(plain)
        if isinstance(key, bool):
            key = "true" if key else "false"
        elif isinstance(key, float):
            key = _go_float_key(key)
        elif isinstance(key, int):
            key = str(key)
        elif key is None:
            raise yaml.constructor.ConstructorError(
                "while converting YAML to JSON", node.start_mark, "a null key has no JSON spelling",
                key_node.start_mark)
        elif not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                "while converting YAML to JSON", node.start_mark, f"a {type(key).__name__} key has no JSON spelling",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


def _go_float_key(x: float) -> str:
    """strconv.FormatFloat(x, 'g', -1, 32): how sigs.k8s.io/yaml spells a float key."""
    try:
        f32 = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        f32 = math.copysign(math.inf, x)
    if math.isinf(f32):  # past float32: Go's +Inf, which sigs.k8s.io/yaml writes .inf
        return ".inf" if f32 > 0 else "-.inf"
    if f32 == 0:
        return "0"
    for digits in range(1, 10):
        sci = f"{f32:.{digits - 1}e}"
        if struct.unpack("f", struct.pack("f", float(sci)))[0] == f32:
            break
    mant, _, exp_text = sci.partition("e")
    exp = int(exp_text)
    if exp < -4 or exp >= 6:
        mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
        return f"{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return _fixed(sci)


def _fixed(text: str) -> str:
    """A number's shortest digits in plain decimal notation (no exponent)."""
    out = format(decimal.Decimal(text), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out


def _yaml_timestamp_text(loader: yaml.Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_OpaYamlLoader.add_constructor(_GO_NUMBER_TAG, _go_number)
_OpaYamlLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float_value)
_OpaYamlLoader.add_constructor("tag:yaml.org,2002:map", _yaml_mapping)
_OpaYamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _yaml_timestamp_text)


def parse_data_file(name: str, raw: bytes, *, kind: str) -> Any:
    """One data file's value, as OPA reads it; ``kind`` is "json" or "yaml"."""
    if kind == "json":
        try:
            # NOTE: an integer past 64 bits becomes a float here, where OPA keeps it
            # exact; regorus computes with floats there anyway (README: the differences).
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BundleError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    try:
        return yaml.load(raw, Loader=_OpaYamlLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise BundleError(f"{where}: not valid YAML ({problem})") from None


# --- Mounting data as OPA does -----------------------------------------------


class _Data:
    """The data document being assembled, and which file set which path."""

    def __init__(self) -> None:
        self.root: dict[str, Any] = {}
        self.origins: dict[tuple[str, ...], str] = {}

    def _origin(self, path: tuple[str, ...]) -> str:
        for n in range(len(path), -1, -1):
            name = self.origins.get(path[:n])
            if name is not None:
                return name
        return "another file"

    def _conflict(self, path: tuple[str, ...], name: str) -> BundleError:
        where = "data." + ".".join(path) if path else "data"
        return BundleError(f"{name}: {where} is already set by {self._origin(path)} "
                           "(data files are merged only where both hold objects, as OPA merges them)")

    def insert(self, keys: tuple[str, ...], value: Any, name: str) -> None:
        """Mount ``value`` at ``data.<keys>`` (OPA's insertData: mktree, then merge)."""
        if not keys:
            if not isinstance(value, dict):
                raise BundleError(f"{name}: a data file at the root of the bundle is mounted as `data` itself, "
                                  f"so it must hold an object, not {_kind(value)}")
            self._merge(self.root, value, (), name)
            return
        node = self.root
        for i, key in enumerate(keys[:-1]):
            if key not in node:
                node[key] = {}
            elif not isinstance(node[key], dict):
                raise self._conflict(keys[: i + 1], name)
            node = node[key]
        last = keys[-1]
        if last not in node:
            node[last] = value
            self.origins[keys] = name
        elif isinstance(node[last], dict) and isinstance(value, dict):
            self._merge(node[last], value, keys, name)
        else:
            raise self._conflict(keys, name)

    def _merge(self, dst: dict, src: dict, path: tuple[str, ...], name: str) -> None:
        clash = _first_conflict(dst, src, path)
        if clash is not None:
            raise self._conflict(clash, name)
        for key, value in src.items():
            here = path + (key,)
            if key in dst:
                self._merge(dst[key], value, here, name)
            else:
                dst[key] = value
                self.origins[here] = name


def _first_conflict(a: dict, b: dict, path: tuple[str, ...]) -> tuple[str, ...] | None:
    for key, value in b.items():
        if key not in a:
            continue
        if not (isinstance(a[key], dict) and isinstance(value, dict)):
            return path + (key,)
        deeper = _first_conflict(a[key], value, path + (key,))
        if deeper is not None:
            return deeper
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "an array", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _old_style(rel: PurePosixPath, shown: str) -> str:
    base = shown[: len(shown) - len(rel.as_posix())]
    target = f"{base}{rel.with_suffix('')}/data{rel.suffix}"
    return (f"{shown}: data is mounted as OPA mounts it, by directory, and only from files named data.json "
            f"or data.yaml: move it to {target} (`git mv {shown} {target}`) to keep it at "
            f"data.{'.'.join(rel.with_suffix('').parts)} (README: upgrade notes)")


# --- Reading a set of files as a bundle -----------------------------------------


class _Files:
    """The files of one bundle root: (path inside the root, bytes), and how to name them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # what goes before a path in messages ("rego/", "bundle.tar.gz/")
        self.items: list[tuple[str, bytes]] = []

    def shown(self, rel: str) -> str:
        return f"{self.prefix}{rel}"


def _assemble(roots: list[_Files], *, include_tests: bool, source: str, signing: "SigningKey | None" = None,
              bundle_format: bool = False, rego_dir: Path | None = None, data_dir: Path | None = None) -> Bundle:
    """Build a Bundle from the files of its roots; every problem is collected, then raised."""
    problems: list[str] = []
    modules: list[Module] = []
    rego_hash: list[tuple[str, bytes]] = []
    data_hash: list[tuple[str, bytes]] = []
    data = _Data()
    manifest: dict[str, Any] = {}

    if bundle_format:
        files = roots[0]
        by_name = dict(files.items)
        if MANIFEST in by_name:
            try:
                manifest = _parse_manifest(by_name[MANIFEST], files.shown(MANIFEST))
            except BundleError as exc:
                problems.extend(exc.problems)
        signed = [rel for rel, _ in files.items if rel.endswith("signatures.json")]
        if signing is not None or signed:
            verify_signatures(files, signing, source)

    v0_default = manifest.get("rego_version") == 0
    file_versions = manifest.get("file_rego_versions") or {}

    for files in roots:
        for rel, raw in files.items:
            shown = files.shown(rel)
            base = rel.rsplit("/", 1)[-1]
            if rel in (MANIFEST,) or rel.endswith("signatures.json"):
                continue
            if base.endswith(".rego"):
                is_test = base.endswith("_test.rego")
                if is_test and not include_tests:
                    continue
                try:
                    src = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problems.append(f"{shown}: not UTF-8 text (byte {exc.start})")
                    continue
                v0 = _rego_v0(rel, file_versions, v0_default)
                modules.append(Module(shown, src, is_test=is_test, rego_v0=v0))
                if not is_test:
                    rego_hash.append((rel, raw))
            elif base in DATA_FILES:
                keys = tuple(PurePosixPath(rel).parent.parts) if "/" in rel else ()
                try:
                    value = parse_data_file(shown, raw, kind="json" if base.endswith(".json") else "yaml")
                    data.insert(keys, value, shown)
                except BundleError as exc:
                    problems.extend(exc.problems)
                    continue
                data_hash.append((rel, raw))
            elif base.endswith(_DATA_LIKE):
                problems.append(_old_style(PurePosixPath(rel), shown))
            elif base in ("policy.wasm", "plan.json", "patch.json"):
                problems.append(f"{shown}: the embedded engine evaluates Rego bundles only (no wasm, plan or "
                                "delta bundles); build the bundle with `opa build` (target rego)")
            # Anything else (a README, a .gitkeep) is not part of the bundle, as in OPA.

    if not any(not m.is_test for m in modules) and not problems:
        problems.append(f"{source}: no .rego files found")
    roots_list = manifest.get("roots")
    if isinstance(roots_list, list):
        problems.extend(_check_roots([str(r).strip("/") for r in roots_list], data.root, source))
    if problems:
        raise BundleError(problems)
    return Bundle(modules, data.root, digest=_hash_sources(rego_hash, data_hash), manifest=manifest,
                  source=source, origins=data.origins, rego_dir=rego_dir, data_dir=data_dir)


def _rego_v0(rel: str, file_versions: dict, default: bool) -> bool:
    for pattern, version in file_versions.items():
        if PurePosixPath("/" + rel).match(str(pattern)) or PurePosixPath(rel).match(str(pattern).lstrip("/")):
            return version == 0
    return default


def _parse_manifest(raw: bytes, shown: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{shown}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{shown}: a manifest is a JSON object")
    problems = []
    if "revision" in doc and not isinstance(doc["revision"], str):
        problems.append(f"{shown}: revision must be a string")
    roots = doc.get("roots")
    if roots is not None and not (isinstance(roots, list) and all(isinstance(r, str) for r in roots)):
        problems.append(f"{shown}: roots must be a list of strings")
    if doc.get("rego_version") not in (None, 0, 1):
        problems.append(f"{shown}: rego_version must be 0 or 1")
    if problems:
        raise BundleError(problems)
    return doc


def _segments(path: str) -> list[str]:
    return path.split("/")


def _root_contains(root: list[str], other: list[str]) -> bool:
    if root == [""]:
        return True
    return len(root) <= len(other) and other[: len(root)] == root


def roots_contain(roots: list[str], path: str) -> bool:
    """OPA's RootPathsContain: ``path`` ("a/b") lies under one of the manifest roots."""
    return any(_root_contains(_segments(r), _segments(path)) for r in roots)


def _check_roots(roots: list[str], data: dict, source: str) -> list[str]:
    problems = []
    for i, a in enumerate(roots):
        for b in roots[i + 1:]:
            if _root_contains(_segments(a), _segments(b)) or _root_contains(_segments(b), _segments(a)):
                problems.append(f"{source}: .manifest has overlapped roots: '{a}' and '{b}'")

    def dfs(value: Any, path: str) -> None:
        if roots_contain(roots, path):
            return
        if isinstance(value, dict) and any(_root_contains(_segments(path), _segments(r)) for r in roots):
            for key, child in value.items():
                dfs(child, f"{path}/{key}" if path else key)
            return
        problems.append(f"{source}: .manifest roots {roots} do not permit data at path '/{path}'")

    if not problems:
        for key, child in data.items():
            dfs(child, key)
    return problems


# --- Signatures, verified as OPA verifies them ----------------------------------


class SigningKey:
    """The key that verifies a signed bundle (``policy.bundle.signing_key``).

    ``key`` is the PEM text of a public key (or certificate, or private key) for
    RS*/PS*/ES*/EdDSA, or the shared secret for HS*; ``scope`` must equal the
    token's ``scope`` claim, as in OPA (both empty by default).
    """

    __slots__ = ("key", "algorithm", "scope", "where", "path")

    def __init__(self, key: str, algorithm: str = "RS256", scope: str | None = None,
                 where: str = "policy.bundle.signing_key", *, path: Path | None = None) -> None:
        self.key = key
        self.algorithm = algorithm
        self.scope = scope or ""
        self.where = where
        self.path = path

    @classmethod
    def from_file(cls, path: Path, algorithm: str = "RS256", scope: str | None = None,
                  where: str = "policy.bundle.signing_key") -> "SigningKey":
        """A key read from ``path`` each time a bundle is verified (a rotated key file is picked up)."""
        return cls("", algorithm, scope, where, path=path)

    def verifier(self) -> Any:
        text = self.key
        if self.path is not None:
            try:
                text = self.path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise BundleError(f"{self.where}.public_key: cannot read {display_path(self.path)} "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
        if self.algorithm.startswith("HS"):
            return text.encode()
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        data = text.encode()
        for load in (lambda: serialization.load_pem_public_key(data),
                     lambda: x509.load_pem_x509_certificate(data).public_key(),
                     lambda: serialization.load_pem_private_key(data, None).public_key()):
            try:
                return load()
            except (ValueError, TypeError):
                continue
        raise BundleError(f"{self.where}.public_key: not a PEM public key, certificate or private key")


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE = re.compile('["\\\\\x00-\x1f\u2028\u2029]')


def _go_string(s: str) -> str:
    return '"' + _GO_ESCAPE.sub(lambda m: _GO_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), s) + '"'


class _Literal(str):
    """A JSON number kept as it was written (Go's json.Number)."""


def _go_float(x: float) -> str:
    """Go's encoding/json spelling of a float64 ('f' between 1e-6 and 1e21, else 'e', e-07 as e-7)."""
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    a = abs(x)
    if a < 1e-6 or a >= 1e21:
        mant, _, exp = f"{x!r}".partition("e") if "e" in repr(x) else f"{x:e}".partition("e")
        sign = "-" if exp.startswith("-") else "+"
        digits = exp.lstrip("+-").lstrip("0") or "0"
        if sign == "+" and len(digits) < 2:
            digits = "0" + digits
        return f"{mant}e{sign}{digits}"
    return _fixed(repr(x))


def _canonical(value: Any, out: list[str]) -> None:
    """OPA's signature hash walk: objects by sorted key, primitives as Go's JSON encoder writes them."""
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_go_string(key))
            out.append(":")
            _canonical(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    elif isinstance(value, _Literal):
        out.append(str.__str__(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_go_float(value))
    else:
        out.append(_go_string(str(value)))


_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA-224": "sha224", "SHA-256": "sha256", "SHA-384": "sha384",
           "SHA-512": "sha512", "SHA-512-224": "sha512_224", "SHA-512-256": "sha512_256"}


def file_digest(rel: str, raw: bytes, algorithm: str, shown: str) -> bytes:
    """What OPA hashes for a file of a signed bundle: structured files (data.json,
    data.yaml, .manifest) by their JSON value in canonical order, others byte for byte."""
    name = _HASHES.get(algorithm)
    if name is None:
        raise BundleError(f"{shown}: unsupported hashing algorithm {algorithm!r} in .signatures.json")
    h = hashlib.new(name)
    base = rel.rsplit("/", 1)[-1]
    if base in ("data.json", MANIFEST, "signatures.json"):
        try:
            value = json.loads(raw, parse_int=_Literal, parse_float=_Literal)
        except ValueError as exc:
            raise BundleError(f"{shown}: not valid JSON ({exc})") from None
    elif base == "data.yaml":
        value = parse_data_file(shown, raw, kind="yaml")
    else:
        h.update(raw)
        return h.digest()
    parts: list[str] = []
    _canonical(value, parts)
    h.update("".join(parts).encode())
    return h.digest()


def verify_signatures(files: _Files, signing: "SigningKey | None", source: str) -> None:
    """Check ``.signatures.json`` as OPA's DefaultVerifier does; raise BundleError naming the file.

    One JWT, signed with the configured key and algorithm, whose ``scope`` is the
    configured scope; every file of the bundle listed with a matching digest, and
    every listed file present.
    """
    import jwt

    sig_files = [(rel, raw) for rel, raw in files.items if rel.endswith("signatures.json")]
    if signing is None:
        raise BundleError(f"{source}: the bundle is signed (.signatures.json) but no key to verify it is "
                          "configured: set policy.bundle.signing_key in regate.yaml")
    if not sig_files:
        raise BundleError(f"{source}: the bundle has no .signatures.json, and {signing.where} says bundles "
                          "must be signed: sign it with `opa build --signing-key ...`")
    rel, raw = sig_files[0]
    shown = files.shown(rel)
    try:
        doc = orjson.loads(raw)
        tokens = doc.get("signatures") if isinstance(doc, dict) else None
    except orjson.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, list) or not tokens:
        raise BundleError(f"{shown}: missing JWT (expected exactly one)")
    if len(tokens) > 1:
        raise BundleError(f"{shown}: multiple JWTs not supported (expected exactly one)")
    plugin = doc.get("plugin")
    if plugin not in (None, "", "_default"):
        raise BundleError(f"{shown}: signed with the verification plugin {plugin!r}; Regate verifies OPA's "
                          "default JWT signatures only")
    try:
        decoded = jwt.PyJWS().decode_complete(str(tokens[0]), key=signing.verifier(),
                                              algorithms=[signing.algorithm])
        payload = orjson.loads(decoded["payload"])
    except BundleError:
        raise
    except (jwt.exceptions.PyJWTError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise BundleError(f"{shown}: the signature does not verify with {signing.where} "
                          f"({signing.algorithm}): {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
        raise BundleError(f"{shown}: the signed payload lists no files")
    if (payload.get("scope") or "") != signing.scope:
        raise BundleError(f"{shown}: scope mismatch (the token says {payload.get('scope')!r}, "
                          f"{signing.where}.scope says {signing.scope!r})")
    listed: dict[str, dict] = {}
    for entry in payload["files"]:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            listed[entry["name"]] = entry
    problems = []
    for rel_file, raw_file in files.items:
        if rel_file.endswith("signatures.json"):
            continue
        entry = listed.pop(rel_file, None)
        shown_file = files.shown(rel_file)
        if entry is None:
            problems.append(f"{shown_file}: not included in the bundle signature (.signatures.json); refused")
            continue
        if not entry.get("algorithm"):
            problems.append(f"{shown_file}: no hashing algorithm given in .signatures.json")
            continue
        try:
            want = bytes.fromhex(str(entry.get("hash", "")))
        except ValueError:
            problems.append(f"{shown_file}: the hash in .signatures.json is not hex")
            continue
        got = file_digest(rel_file, raw_file, str(entry["algorithm"]), shown_file)
        if got != want:
            problems.append(f"{shown_file}: digest mismatch: the file is not the one the bundle signature "
                            f"signs (want {want.hex()}, got {got.hex()}); refused")
    for name in sorted(listed):
        problems.append(f"{files.shown(name)}: listed in the bundle signature but not found in the bundle; refused")
    if problems:
        raise BundleError(problems)


# --- The three sources ----------------------------------------------------------


def _read_tree(root: Path, prefix: str, problems: list[str], *, hidden: tuple[str, ...] = ()) -> _Files:
    files = _Files(prefix)
    paths = _walk(root, lambda n: n.endswith((".rego",) + _DATA_LIKE + (".wasm",)))
    for name in hidden:
        if (root / name).is_file():
            paths.append(root / name)
    for p in paths:
        try:
            raw = p.read_bytes()
        except OSError as exc:
            problems.append(f"{prefix}{p.relative_to(root).as_posix()}: cannot read ({exc.strerror})")
            continue
        files.items.append((p.relative_to(root).as_posix(), raw))
    return files


def load_bundle(rego_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None, *,
                include_tests: bool = False) -> Bundle:
    """Regate's two directories as one bundle; raise BundleError naming every file that is wrong.

    Both are roots of the bundle, as ``opa run rego/ policies/`` takes them:
    modules and data files are read from each (normally modules from the rego
    directory and data from the data directory).
    """
    rdir = Path(rego_dir)
    if not rdir.is_dir():
        if rdir.is_file() and rdir.name.endswith((".tar.gz", ".tgz")):
            return load_bundle_file(rdir, include_tests=include_tests)
        raise BundleError(f"{display_path(rdir)}: rego directory does not exist (policy.rego in regate.yaml)")
    problems: list[str] = []
    roots = [_read_tree(rdir, _prefix(rdir), problems)]
    ddir = Path(data_dir) if data_dir is not None else None
    if ddir is not None:
        if not ddir.is_dir():
            problems.append(f"{display_path(ddir)}: data directory does not exist (policy.data in regate.yaml)")
        elif ddir.resolve() != rdir.resolve():
            roots.append(_read_tree(ddir, _prefix(ddir), problems))
    if problems:
        raise BundleError(problems)
    if not any(rel.endswith(".rego") and not rel.endswith("_test.rego") for rel, _ in roots[0].items):
        raise BundleError(f"{display_path(rdir)}: no .rego files found (policy.rego in regate.yaml)")
    source = " + ".join(f.prefix for f in roots)
    return _assemble(roots, include_tests=include_tests, source=source, rego_dir=rdir, data_dir=ddir)


def _prefix(directory: Path) -> str:
    shown = display_path(directory)
    return shown if shown.endswith("/") else shown + "/"


def load_bundle_file(path: str | os.PathLike[str], *, signing: SigningKey | None = None,
                     include_tests: bool = False) -> Bundle:
    """An OPA bundle: a ``.tar.gz`` made by ``opa build``, or a directory in bundle layout."""
    p = Path(path)
    shown = display_path(p)
    if p.is_dir():
        problems: list[str] = []
        files = _read_tree(p, _prefix(p), problems, hidden=(MANIFEST, SIGNATURES))
        if problems:
            raise BundleError(problems)
        return _assemble([files], include_tests=include_tests, source=shown, signing=signing, bundle_format=True)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BundleError(f"{shown}: cannot read the bundle ({exc.strerror}) (policy.bundle.path in regate.yaml)") from None
    return read_bundle_tarball(raw, shown, signing=signing, include_tests=include_tests)


def read_bundle_tarball(raw: bytes, name: str, *, signing: SigningKey | None = None,
                        include_tests: bool = False) -> Bundle:
    """A bundle from the bytes of an ``opa build`` tarball; ``name`` is how messages call it."""
    files = _Files(name + "/")
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for member in tar:
                rel = _member_path(member.name)
                if member.isdir() or rel is None:
                    continue
                if not member.isfile():
                    raise BundleError(f"{name}/{rel}: not a plain file (links are not part of a bundle)")
                if member.size > MAX_FILE_BYTES:
                    raise BundleError(f"{name}/{rel}: {member.size} bytes, over the limit of {MAX_FILE_BYTES}")
                total += member.size
                if total > MAX_BUNDLE_BYTES:
                    raise BundleError(f"{name}: more than {MAX_BUNDLE_BYTES} bytes once unpacked")
                if rel in seen:
                    raise BundleError(f"{name}/{rel}: the tarball holds this file twice")
                seen.add(rel)
                fh = tar.extractfile(member)
                files.items.append((rel, fh.read() if fh is not None else b""))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{name}: not a gzipped tar bundle ({exc})") from None
    return _assemble([files], include_tests=include_tests, source=name, signing=signing, bundle_format=True)


def _member_path(name: str) -> str | None:
    parts = [p for p in PurePosixPath(name.lstrip("/")).parts if p not in ("", ".")]
    if not parts:
        return None
    if ".." in parts:
        raise BundleError(f"{name}: a path climbing out of the bundle")
    return "/".join(parts)


class BundleSource:
    """Where an engine reads its bundle from on start and on reload (blocking: run it in a thread)."""

    #: A bundle that fails to load at start stops Regate; False: start without one and wait.
    required = True

    def load(self, *, include_tests: bool = False) -> Bundle:  # pragma: no cover - interface
        raise NotImplementedError


class DirectorySource(BundleSource):
    """``policy.rego`` + ``policy.data``."""

    def __init__(self, rego_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None) -> None:
        self.rego_dir = Path(rego_dir)
        self.data_dir = Path(data_dir) if data_dir is not None else None

    def load(self, *, include_tests: bool = False) -> Bundle:
        return load_bundle(self.rego_dir, self.data_dir, include_tests=include_tests)

    def __str__(self) -> str:
        return f"{self.rego_dir} + {self.data_dir}"


class FileSource(BundleSource):
    """``policy.bundle.path``: an ``opa build`` tarball or a bundle directory."""

    def __init__(self, path: str | os.PathLike[str], signing: SigningKey | None = None) -> None:
        self.path = Path(path)
        self.signing = signing

    def load(self, *, include_tests: bool = False) -> Bundle:
        return load_bundle_file(self.path, signing=self.signing, include_tests=include_tests)

    def __str__(self) -> str:
        return str(self.path)
