"""One run: every chosen scenario on every chosen broker, in one temporary directory, with every
worker stopped at the end whatever happens."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.options import Options
from benchmarks.report import Row
from benchmarks.scenarios import SCENARIOS
from benchmarks.scenarios.common import Context
from benchmarks.services import SERVICES
from benchmarks.workers import Supervisor


def run(options: Options) -> tuple[list[Row], list[str]]:
    """The table's rows, scenario by scenario and broker by broker, and the errors met.

    A broker that is not running gives rows without figures and a note; an error in one
    measurement leaves its figure empty and the run goes on. The workers' logs are kept (and
    their directory named) when something failed.
    """
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-bench-"))
    rows: list[Row] = []
    errors: list[str] = []
    try:
        with Supervisor(workdir) as supervisor:
            for scenario in options.scenarios:
                print(f"{scenario}:", file=sys.stderr, flush=True)
                for broker in options.brokers:
                    service = SERVICES[broker]
                    reason = service.unavailable()
                    if reason:
                        print(f"  [{broker}] skipped: {reason}", file=sys.stderr, flush=True)
                        rows.append(
                            Row(
                                scenario,
                                scenario,
                                broker,
                                "",
                                True,
                                notes=[reason],
                                comparable=False,
                            )
                        )
                        continue
                    context = Context(options, service, supervisor, workdir)
                    started = time.monotonic()
                    rows.extend(SCENARIOS[scenario](context))
                    errors.extend(context.errors)
                    context.progress(f"{scenario} done in {time.monotonic() - started:.1f} s")
    finally:
        if errors:
            print(f"worker logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows, errors
