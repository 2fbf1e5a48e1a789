"""``jobs.ranges``: the one range checker of numeric options, one sentence when refused."""

from __future__ import annotations

import pytest

from jobs import JobError
from jobs.ranges import INT64, Range, check_range


@pytest.mark.parametrize("value, allowed, text", [
    (0, Range(low=1), "--nodes must be >= 1, got 0"),
    (-5, Range(low=1, why="minutes"), "--nodes must be >= 1, got -5 (minutes)"),
    (0.0, Range(low=0.0, low_open=True), "--nodes must be > 0, got 0.0"),
    (float("inf"), Range(low=0.0, low_open=True), "--nodes must be finite and > 0, got inf"),
    (float("nan"), Range(low=0.0), "--nodes must be finite and >= 0, got nan"),
    (INT64, Range(low=1), "--nodes must be >= 1, got 9223372036854775808"),
    (3, Range(low=0, high=2), "--nodes must be in [0, 2], got 3"),
    (2, Range(low=0, high=2, high_open=True), "--nodes must be in [0, 2), got 2"),
    (3, Range(high=2), "--nodes must be <= 2, got 3"),
])
def test_a_value_outside_its_range_is_refused_with_one_sentence(value, allowed: Range,
                                                                 text: str) -> None:
    with pytest.raises(JobError) as caught:
        check_range("--nodes", value, allowed)
    assert str(caught.value) == text
    assert (caught.value.subject, caught.value.detail) == ("--nodes", text[len("--nodes "):])


@pytest.mark.parametrize("value, allowed", [
    (1, Range(low=1)), (0, Range(low=0)), (0.5, Range(low=0.0, low_open=True)),
    (None, Range(low=1)), (-7, None), (2, Range(low=0, high=2)),
])
def test_a_value_inside_its_range_or_not_given_passes(value, allowed: Range | None) -> None:
    check_range("--nodes", value, allowed)
