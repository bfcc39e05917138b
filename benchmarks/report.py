"""Rows of figures, the printed table, and the JSON document.

``ratio`` is how many times better celeriac is than Celery, whatever the unit: celeriac ÷ Celery
for rates, Celery ÷ celeriac for latencies and memory. Above 1, celeriac is ahead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.targets import target_for


@dataclass(slots=True)
class Row:
    """One line of the table: one figure of one scenario on one broker, for both projects."""

    #: Key of the figure (``drain``, ``delay``, ``roundtrip_p50`` …), as the targets name it.
    metric: str
    #: What the line shows, as printed.
    title: str
    broker: str
    unit: str
    higher_is_better: bool
    celeriac: float | None = None
    celery: float | None = None
    #: The worker configuration each figure comes from (Celery: its best pool).
    celeriac_config: str = ""
    celery_config: str = ""
    #: Why a figure is missing, or what else the reader must know.
    notes: list[str] = field(default_factory=list)
    #: Every measurement behind the figures: each pool, each repetition, counts.
    details: dict[str, Any] = field(default_factory=dict)
    #: Whether ``ratio`` means something (not for a growth in percent, which may be 0).
    comparable: bool = True

    @property
    def ratio(self) -> float | None:
        if not self.comparable or self.celeriac is None or self.celery is None:
            return None
        if self.higher_is_better:
            return self.celeriac / self.celery if self.celery > 0 else None
        return self.celery / self.celeriac if self.celeriac > 0 else None

    @property
    def target(self) -> str | None:
        found = target_for(self.metric, self.broker)
        return found.text if found else None

    @property
    def passed(self) -> bool | None:
        found = target_for(self.metric, self.broker)
        if found is None or self.celeriac is None:
            return None
        return found.check(self.celeriac, self.celery)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ratio=self.ratio, target=self.target, passed=self.passed)
        return data


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "N/A"
    if unit == "tasks/s":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def _cell(value: float | None, unit: str, config: str) -> str:
    text = _number(value, unit)
    return f"{text} ({config})" if value is not None and config else text


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table (Markdown-compatible), with the notes below it."""
    header = ["scenario", "broker", "unit", "celeriac", "Celery (best pool)", "ratio", "target", ""]
    lines: list[list[str]] = []
    notes: list[str] = []
    for row in rows:
        marks = ""
        for note in row.notes:
            if note not in notes:
                notes.append(note)
            marks += f" [{notes.index(note) + 1}]"
        ratio = row.ratio
        passed = row.passed
        lines.append(
            [
                row.title,
                row.broker,
                row.unit,
                _cell(row.celeriac, row.unit, row.celeriac_config),
                _cell(row.celery, row.unit, row.celery_config),
                "—" if ratio is None else f"{ratio:.1f}x",
                row.target or "—",
                ("" if passed is None else "pass" if passed else "FAIL") + marks,
            ]
        )
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines]
    out += ["", "ratio: how many times better celeriac is (above 1: celeriac ahead)."]
    out += [f"[{number}] {note}" for number, note in enumerate(notes, 1)]
    return "\n".join(out)


def write_json(
    path: Path, rows: list[Row], machine: dict[str, Any], options: dict[str, Any]
) -> None:
    document = {
        "machine": machine,
        "options": options,
        "rows": [row.as_dict() for row in rows],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
