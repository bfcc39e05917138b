"""The benchmark's table: ratios point the same way for every unit, targets are checked, notes are
numbered once, and the command line refuses what it does not know."""

from __future__ import annotations

import pytest

from benchmarks import cli
from benchmarks.report import Row, table


def test_ratio_is_celeriacs_advantage_whatever_the_unit() -> None:
    rate = Row("drain", "drain", "redis", "tasks/s", True, celeriac=3000.0, celery=1000.0)
    latency = Row("roundtrip_p50", "p50", "redis", "ms", False, celeriac=0.5, celery=2.0)
    assert rate.ratio == pytest.approx(3.0)
    assert latency.ratio == pytest.approx(4.0)


def test_no_ratio_without_both_figures_or_for_a_growth() -> None:
    assert Row("drain", "d", "sqlite", "tasks/s", True, celeriac=1.0).ratio is None
    growth = Row("rss_growth", "g", "redis", "%", False, celeriac=1.0, celery=2.0, comparable=False)
    assert growth.ratio is None


def test_targets_compare_with_celery_where_the_issue_says_so() -> None:
    # Redis drain: at least 5,000/s AND at least 10x Celery.
    fast_but_close = Row("drain", "d", "redis", "tasks/s", True, celeriac=6000.0, celery=1000.0)
    assert fast_but_close.passed is False
    assert Row("drain", "d", "redis", "tasks/s", True, celeriac=10_000.0, celery=900.0).passed
    # Without Celery's figure a relative target cannot be judged.
    assert Row("drain", "d", "rabbitmq", "tasks/s", True, celeriac=9e9).passed is None
    # Absolute targets need celeriac's figure only; untargeted rows have none.
    assert Row("idle_rss", "i", "sqlite", "MB", False, celeriac=49.0).passed is True
    assert Row("roundtrip_p50", "p", "sqlite", "ms", False, celeriac=9.0).target is None


def test_table_numbers_notes_once_and_shows_missing_figures() -> None:
    note = "Celery has no sqlite broker to compare with"
    rows = [
        Row("drain", "drain", "sqlite", "tasks/s", True, celeriac=2500.0, notes=[note]),
        Row("delay", "delay", "sqlite", "tasks/s", True, celeriac=3000.0, notes=[note]),
    ]
    text = table(rows)
    assert text.count(note) == 1
    assert text.count("[1]") == 3  # two rows point at the one note
    assert "2,500" in text and "N/A" in text and "pass" in text


@pytest.mark.parametrize(
    "argv",
    [["--brokers", "redis,kafka"], ["--scenarios", "drain,speed"], ["-n", "1"], ["--repeat", "0"]],
)
def test_command_line_refuses_unknown_values(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
