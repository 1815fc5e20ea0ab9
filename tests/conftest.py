import hashlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from tests.support.procs import start_upstream


def pytest_configure(config) -> None:
    """A declared test dependency that is missing fails the run, naming it: no test file may
    turn into a silent skip because `mcp` or `hypothesis` is not installed."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["test"]
    missing = []
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if missing:
        raise pytest.UsageError(
            "missing test dependencies declared in pyproject.toml [project.optional-dependencies] test: "
            + ", ".join(missing) + " -- install them with: pip install -e '.[test]'")


AGENT_KEY = "test-key-coder-7"
OTHER_KEY = "test-key-analyst-2"


@pytest.fixture(scope="session")
def upstream():
    proc, url = start_upstream()
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    lines = ["keys:"]
    for key, agent in ((AGENT_KEY, "coder-7"), (OTHER_KEY, "analyst-2")):
        lines += [f"  - sha256: {hashlib.sha256(key.encode()).hexdigest()}", f"    agent: {agent}"]
    path.write_text("\n".join(lines) + "\n")
    return path
