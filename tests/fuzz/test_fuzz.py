"""The fuzz targets of tests/fuzz/targets.py: the seed corpus replayed as regression
tests, then hypothesis-generated inputs for a bounded number of examples.

`make test` runs a few hundred examples per target, derandomised (the same inputs
each run: no flaky CI); `make fuzz` sets REGATE_FUZZ_EXAMPLES high, randomises,
and saves every input that breaks a target into the corpus (REGATE_FUZZ_SAVE=1).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz import targets
from tests.fuzz.strategies import json_bodies, mcp_bodies, policy_inputs, route_paths, sse_streams

FUZZING = bool(os.environ.get("REGATE_FUZZ_EXAMPLES"))
EXAMPLES = int(os.environ.get("REGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZING,
                suppress_health_check=list(HealthCheck))


def _corpus():
    # corpus/http/ holds raw requests: tests/security/test_differential.py replays those.
    for d in sorted(targets.CORPUS.iterdir()):
        if d.name not in targets.TARGETS:
            continue
        for f in sorted(d.iterdir()):
            yield pytest.param(d.name, f, id=f"{d.name}/{f.name}")


@pytest.mark.parametrize("target,path", list(_corpus()))
def test_corpus_replays(target, path):
    targets.run(target, path.read_bytes())


# --------------------------------------------------------------------- the fuzz runs

@FUZZ
@given(route_paths())
def test_fuzz_route(data):
    targets.run("route", data)


@FUZZ
@given(json_bodies())
def test_fuzz_json(data):
    targets.run("json", data)


@FUZZ
@given(policy_inputs())
def test_fuzz_policy_input(data):
    targets.run("policy_input", data)


@FUZZ
@given(mcp_bodies())
def test_fuzz_mcp(data):
    targets.run("mcp", data)


@FUZZ
@given(sse_streams())
def test_fuzz_sse(data):
    targets.run("sse", data)
