"""Policy bundles of a chosen size for the scaling curves: the shipped Rego and
data, with the agents grown to N.

The shipped agents stay (the benchmark calls as coder-7, so the decision is the
shipped one); generated agents `bench-agent-NNNNNN` fill the rest, each with
grants shaped like the shipped ones. A grown bundle holds them as
`agents.json` in place of `agents.yaml` (same mount point, data.agents): a
generated data set of that size is JSON in practice, and parsing 100,000
agents of YAML takes over half a minute even with libyaml, which would measure
the YAML parser rather than the policy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import yaml

from .servers import ROOT

SHIPPED_REGO = ROOT / "rego"
SHIPPED_DATA = ROOT / "policies"


def data_file(data_dir: Path, name: str) -> Path | None:
    """The file holding data.<name> in a data directory, in either layout: OPA's
    `<name>/data.{json,yaml}` or the older flat `<name>.{json,yaml}`."""
    for cand in (data_dir / name / "data.json", data_dir / name / "data.yaml", data_dir / f"{name}.json",
                 data_dir / f"{name}.yaml"):
        if cand.exists():
            return cand
    return None


def write_data(data_dir: Path, name: str, doc: object) -> Path:
    """Replace data.<name> with `doc`, as JSON, in the layout the directory uses."""
    old = data_file(data_dir, name)
    nested = old is None or old.name.startswith("data.")
    if old is not None:
        old.unlink()
    path = data_dir / name / "data.json" if nested else data_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc))
    return path


def shipped_agents() -> dict:
    path = data_file(SHIPPED_DATA, "agents")
    if path is None:
        return {}
    if path.suffix == ".json":
        return orjson.loads(path.read_bytes())
    return yaml.safe_load(path.read_text()) or {}


def _agent(i: int) -> tuple[str, dict]:
    # Three grant shapes so the data is not one repeated object.
    name = f"bench-agent-{i:06d}"
    if i % 3 == 0:
        tools = {"search": {"methods": ["GET", "POST"]}, "files": {"methods": ["GET"]}}
    elif i % 3 == 1:
        tools = {"shell": {"methods": ["POST"], "timeout_ms": 10000},
                 "files": {"methods": ["GET", "PUT"], "root": f"/workspace/{name}/"}}
    else:
        tools = {"payments": {"methods": ["POST"], "approval_above": 100, "max_amount": 5000}}
    return name, {"description": "generated benchmark agent", "tools": tools}


def make_bundle(dest: Path, agents: int) -> tuple[Path, Path]:
    """Write rego/ and policies/ under `dest` with `agents` agents in total; return (rego, data).

    With no more agents than shipped, the bundle is the shipped one, byte for byte."""
    rego = dest / "rego"
    data = dest / "policies"
    for d in (rego, data):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(SHIPPED_REGO, rego)
    shutil.copytree(SHIPPED_DATA, data)
    shipped = shipped_agents()
    extra = agents - len(shipped)
    if extra > 0:
        doc = dict(shipped)
        doc.update(_agent(i) for i in range(extra))
        write_data(data, "agents", doc)
    return rego, data


def load_data(data_dir: Path) -> dict:
    """The data document as OPA mounts it: each file's content under its stem."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc: dict = {}
    for path in sorted(data_dir.iterdir()):
        if path.is_dir():
            inner = data_file(data_dir, path.name)
            if inner is not None and inner.parent == path:
                doc[path.name] = (orjson.loads(inner.read_bytes()) if inner.suffix == ".json"
                                  else yaml.load(inner.read_text(), Loader=loader))
        elif path.suffix == ".json":
            doc[path.stem] = orjson.loads(path.read_bytes())
        elif path.suffix in (".yaml", ".yml"):
            doc[path.stem] = yaml.load(path.read_text(), Loader=loader)
    return doc


def rego_modules(rego_dir: Path) -> dict[str, str]:
    """The policy modules (subdirectories included, as Regate loads them), without their *_test.rego tests."""
    return {str(p.relative_to(rego_dir)): p.read_text() for p in sorted(rego_dir.rglob("*.rego"))
            if not p.name.endswith("_test.rego")}
