"""Hypothesis drives the tool breaker's state machine against the reference in
test_breakers_circuit.check_sequence: no sequence of outcomes and clock steps lets an
open breaker forward more than its probe budget, or keeps it open past its cool-down."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_breakers_circuit import ALL_OUTCOMES, check_sequence  # noqa: E402

ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit")),
        st.tuples(st.just("end"), st.integers(0, 40), st.sampled_from(ALL_OUTCOMES)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 0.001, 0.5, 1.0, 4.999, 5.0, 10.0, 29.9, 30.0, 100.0])),
        st.tuples(st.just("tick"), st.floats(0, 120, allow_nan=False)),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_no_sequence_breaks_the_breaker(seq):
    check_sequence(seq)
