"""``python -m benchmarks``: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from benchmarks import machine, report, runner
from benchmarks.options import BROKERS, SCENARIOS, Options
from benchmarks.services import SERVICES


def _choice_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _at_least_two(value: str) -> int:
    """A count of tasks: a rate needs two completions at least."""
    number = int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {number}")
    return number


def parser() -> argparse.ArgumentParser:
    defaults = Options()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "celeriac and the real Celery side by side, in one run on this machine: drain, "
            "enqueue, round trip, I/O-bound and memory, on Redis, RabbitMQ and SQLite."
        ),
        epilog=(
            "Progress goes to stderr, the table to stdout. Exit status 1 when a measurement failed "
            "(its figure is N/A and the run goes on; the workers' logs are kept and named)."
        ),
    )
    p.add_argument(
        "--scenarios",
        type=_choice_list(SCENARIOS),
        default=list(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--brokers",
        type=_choice_list(BROKERS),
        default=list(BROKERS),
        help=f"comma-separated, from {','.join(BROKERS)} (default: all)",
    )
    p.add_argument(
        "-n",
        "--tasks",
        type=_at_least_two,
        help=f"tasks of the drain and enqueue scenarios (default {defaults.tasks:,})",
    )
    p.add_argument(
        "--roundtrips",
        type=_at_least_two,
        help=f"timed round trips (default {defaults.roundtrips:,})",
    )
    p.add_argument(
        "--io-tasks",
        type=_at_least_two,
        help=f"tasks of the I/O-bound scenario (default {defaults.io_tasks:,})",
    )
    p.add_argument(
        "--io-concurrency",
        type=_at_least_two,
        help=f"concurrency of the I/O-bound scenario (default {defaults.io_concurrency})",
    )
    p.add_argument(
        "--memory-tasks",
        type=_at_least_two,
        help=f"tasks before celeriac's RSS is read again (default {defaults.memory_tasks:,})",
    )
    p.add_argument(
        "--celery-memory-tasks",
        type=_at_least_two,
        help=f"the same for Celery (default {defaults.celery_memory_tasks:,})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="make each measurement this many times and report the median (default 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run in seconds: tiny counts, one Celery pool per scenario",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the rows and the machine's facts to PATH as JSON",
    )
    return p


def options_from(args: argparse.Namespace) -> Options:
    overrides = {
        name: getattr(args, name)
        for name in (
            "tasks",
            "roundtrips",
            "io_tasks",
            "io_concurrency",
            "memory_tasks",
            "celery_memory_tasks",
        )
        if getattr(args, name) is not None
    }
    overrides.update(
        scenarios=args.scenarios, brokers=args.brokers, repeat=args.repeat, json=args.json
    )
    return Options.quick_run(**overrides) if args.quick else Options(**overrides)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM ends the run like Ctrl-C: through the finally blocks that stop every worker.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    args = command_line.parse_args(argv)
    if args.repeat < 1:
        command_line.error("--repeat must be at least 1")
    options = options_from(args)
    signal.signal(signal.SIGTERM, _terminate)
    facts = machine.facts(SERVICES[name] for name in options.brokers)
    print(machine.summary(facts), file=sys.stderr, flush=True)
    rows, errors = runner.run(options)
    print()
    print(machine.summary(facts))
    print()
    print(report.table(rows))
    if options.json is not None:
        report.write_json(options.json, rows, facts, options.as_dict())
        print(f"\nJSON written to {options.json}")
    return 1 if errors else 0
