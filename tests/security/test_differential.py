"""Differential check in the spirit of HTTP Garden: generated hostile requests, each
sent raw to the running Regate. For every one, what the tool behind it received is
exactly one request, and the one Regate judged (same decision id, tool, method, path
and body as its allow record), or nothing at all when Regate refused it. Regate never
answers 5xx, never hangs, and still answers afterwards.

`make test` runs a bounded, derandomised set and replays tests/fuzz/corpus/http/; `make fuzz`
runs many more (REGATE_FUZZ_EXAMPLES) and saves a request that breaks the property there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings

from tests.fuzz.strategies import hostile_requests
from tests.security.conftest import KEYS, ERROR_KEYS, assert_judged, exchange

FUZZING = bool(os.environ.get("REGATE_FUZZ_EXAMPLES"))
EXAMPLES = int(os.environ.get("REGATE_FUZZ_EXAMPLES", "150"))

pytestmark = pytest.mark.timeout(300 if FUZZING else 60)


CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "http"


def check(judge, data: bytes, replay: bool = False) -> None:
    """The differential property for one raw request (see the module docstring)."""
    try:
        _check(judge, data, replay)
    except Exception:
        if os.environ.get("REGATE_FUZZ_SAVE"):
            CORPUS.mkdir(parents=True, exist_ok=True)
            (CORPUS / f"crash-{hashlib.sha256(data).hexdigest()[:12]}").write_bytes(data)
        raise


def _check(judge, data: bytes, replay: bool) -> None:
    ex, got = judge(data, timeout=5)
    assert ex.responses or ex.closed, f"no answer and the connection is still open: {data[:300]!r}"
    assert len(got) <= 1, got
    if not ex.responses:
        assert got == [], got  # closed without an answer: nothing may have run
        return
    resp = ex.responses[0]
    if not replay:
        event(f"status {resp.status}")
    assert resp.status < 500, (resp.status, resp.body[:300], data[:300])
    regate_said_no = False
    if (resp.header("Content-Type") or "").startswith("application/json") and resp.status >= 400:
        doc = orjson.loads(resp.body)
        regate_said_no = isinstance(doc, dict) and set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS
    if regate_said_no or resp.status == 202:
        assert got == [], (resp.status, resp.body[:200], got)
        return
    assert resp.status == 200, (resp.status, resp.body[:300], data[:300])
    assert len(got) == 1, (got, data[:300])
    rec = got[0]
    assert rec["decision_id"] == resp.decision_id
    tool = rec["raw_path"].split("/")[2].split("?")[0]
    assert_judged(judge.regate.audit_dir, rec, tool)


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_replays(judge, path):
    check(judge, path.read_bytes(), replay=True)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZING,
          suppress_health_check=list(HealthCheck))
@given(hostile_requests(KEYS))
def test_each_hostile_request_reaches_one_tool_once_as_judged_or_nothing(judge, data):
    check(judge, data)


def test_regate_still_answers_after_the_run(judge):
    judge.alive()
    assert exchange(judge.regate.port, b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\n\r\n").first.status == 401
