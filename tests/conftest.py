import hashlib
from pathlib import Path

import pytest

from tests.support.procs import start_upstream

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
