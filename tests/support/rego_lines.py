"""Where a rule is in the shipped Rego, read from the files, so tests that check rule
locations follow the policy as it changes instead of pinning line numbers."""

from __future__ import annotations

from tests.support.procs import ROOT


def rule_line(path: str, head: str, marker: str) -> int:
    """The line (1-based) of the rule that starts with `head` and whose body says `marker`."""
    lines = (ROOT / path).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(head):
            body = "\n".join(lines[i:next((j for j in range(i + 1, len(lines)) if lines[j] == "}"), len(lines))])
            if marker in body:
                return i + 1
    raise AssertionError(f"{path}: no rule {head!r} saying {marker!r}")
