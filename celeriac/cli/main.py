"""The ``celeriac`` command: worker, call, result, purge — with Celery's option names."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from celeriac import __version__
from celeriac.app.base import Celery
from celeriac.cli.loading import AppNotFound, find_app
from celeriac.exceptions import CeleriacError
from celeriac.utils.redact import redact_url
from celeriac.worker.logs import LEVELS, setup_logging


class _Context:
    def __init__(self, app_spec: str | None, broker: str | None, backend: str | None) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self.backend = backend
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            if self.app_spec:
                try:
                    app = find_app(self.app_spec)
                except AppNotFound as exc:
                    raise click.ClickException(f"Unable to load the celeriac app: {exc}") from None
            else:
                app = Celery()
            if self.broker:
                app.conf.broker_url = self.broker
            if self.backend:
                app.conf.result_backend = self.backend
            self._app = app
        return self._app


def _json_arg(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} must be JSON: {exc}") from None
    if kind is list and isinstance(parsed, list):
        return parsed
    if kind is dict and isinstance(parsed, dict):
        return parsed
    raise click.BadParameter(f"{what} must be a JSON {'array' if kind is list else 'object'}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="celeriac")
@click.option(
    "-A", "--app", "app_spec", metavar="MODULE", help="The app: module, module.attr or module:attr."
)
@click.option("-b", "--broker", help="Broker URL (overrides broker_url).")
@click.option("--result-backend", help="Result store URL (overrides result_backend).")
@click.pass_context
def main(
    ctx: click.Context, app_spec: str | None, broker: str | None, result_backend: str | None
) -> None:
    """celeriac: a Celery-compatible task queue."""
    ctx.obj = _Context(app_spec, broker, result_backend)


@main.command()
@click.option(
    "-Q",
    "--queues",
    help="Comma-separated queues to consume (default: task_default_queue); name:N runs at most "
    "N tasks of that queue at once, in slots of its own (e.g. -Q cpu:4,io:500,celery).",
)
@click.option(
    "-l",
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(LEVELS, case_sensitive=False),
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Sync tasks run at once: the pool's threads or processes (default: CPUs).",
)
@click.option(
    "--async-concurrency",
    type=click.IntRange(min=1),
    help="async def tasks run at once on the event loop (default: worker_async_concurrency, "
    "else the larger of -c and 100; with -P solo, one task at a time).",
)
@click.option(
    "-P",
    "--pool",
    default="threads",
    show_default=True,
    help="Pool for sync tasks: prefork (alias processes), threads or solo.",
)
@click.option("-n", "--hostname", help="Node name (%h, %n, %d expand as in Celery).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1), help="Messages leased per slot.")
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Hard time limit in seconds of tasks that set none (default: task_time_limit).",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Soft time limit in seconds of tasks that set none (default: task_soft_time_limit).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="prefork: replace a pool process after this many tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    help="prefork: replace a pool process after a task leaves its resident memory above this (KiB).",
)
@click.pass_obj
def worker(
    obj: _Context,
    queues: str | None,
    loglevel: str,
    concurrency: int | None,
    async_concurrency: int | None,
    pool: str,
    hostname: str | None,
    prefetch_multiplier: int | None,
    time_limit: float | None,
    soft_time_limit: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
) -> None:
    """Start a worker."""
    from celeriac.worker.slots import parse_queues
    from celeriac.worker.worker import Worker

    try:
        queue_list, queue_concurrency = parse_queues(queues or "")
    except CeleriacError as exc:
        raise click.BadParameter(str(exc), param_hint="'-Q' / '--queues'") from None
    setup_logging(loglevel)
    app = obj.app
    try:
        app.import_default_modules()
        w = Worker(
            app,
            queues=queue_list or None,
            queue_concurrency=queue_concurrency,
            concurrency=concurrency,
            async_concurrency=async_concurrency,
            pool=pool,
            hostname=hostname,
            prefetch_multiplier=prefetch_multiplier,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
    except CeleriacError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_banner(app, w), err=True)
    try:
        status = w.start()
    except CeleriacError as exc:
        raise click.ClickException(str(exc)) from None
    logging.shutdown()
    if w._cold:
        os._exit(1)  # running sync bodies were given back; do not wait for their threads
    sys.exit(status)


def _banner(app: Celery, w: Any) -> str:
    tasks = sorted(app.tasks)
    lines = [
        f" -------------- {w.hostname} v{__version__}",
        f" .> app:         {app.main or '__main__'}",
        f" .> transport:   {redact_url(app.conf.resolved_broker_url())}",
        f" .> results:     {redact_url(app.conf.resolved_result_backend())}",
        f" .> concurrency: {_concurrency(w)}",
        f" .> prefetch:    {w.prefetch}",
        f" .> acks:        {'late (after the task ran)' if app.conf.task_acks_late else 'early'}",
        " [queues]",
        *(f"  .> {_queue_line(w, q)}" for q in w.queues),
        " [tasks]",
        *(f"  . {t}" for t in tasks),
    ]
    return "\n".join(lines) + "\n"


def _concurrency(w: Any) -> str:
    if w.slots.shared:
        return f"{w.concurrency} ({w.pool_name}; async def tasks too, one at a time)"
    return f"{w.concurrency} ({w.pool_name}), {w.async_concurrency} async def tasks (event loop)"


def _queue_line(w: Any, queue: str) -> str:
    group = w.slots.group_of(queue)
    if group.limit is None:
        return queue
    return f"{queue} ({group.limit} at once, prefetch {group.prefetch})"


@main.command()
@click.argument("name")
@click.option(
    "-a", "--args", "args_json", help='Positional arguments as a JSON array, e.g. "[30, 42]".'
)
@click.option("-k", "--kwargs", "kwargs_json", help="Keyword arguments as a JSON object.")
@click.option("--countdown", type=float, help="Seconds to wait before the task may run.")
@click.option("--expires", type=float, help="Seconds after which the task is revoked unrun.")
@click.option("--queue", help="Queue to send to.")
@click.option("--serializer", help="Serializer of the arguments.")
@click.pass_obj
def call(
    obj: _Context,
    name: str,
    args_json: str | None,
    kwargs_json: str | None,
    countdown: float | None,
    expires: float | None,
    queue: str | None,
    serializer: str | None,
) -> None:
    """Send task NAME and print its id."""
    args = _json_arg(args_json, "--args", list)
    kwargs = _json_arg(kwargs_json, "--kwargs", dict)
    options = {
        k: v
        for k, v in {
            "countdown": countdown,
            "expires": expires,
            "queue": queue,
            "serializer": serializer,
        }.items()
        if v is not None
    }
    try:
        result = obj.app.send_task(name, args, kwargs, **options)
    except CeleriacError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.id)


@main.command()
@click.argument("task_id")
@click.option(
    "--timeout", type=float, help="Seconds to wait for the task to finish (default: forever)."
)
@click.option("--no-wait", is_flag=True, help="Print the current state at once instead of waiting.")
@click.option(
    "-t", "--traceback", "show_traceback", is_flag=True, help="Print the traceback of a failure."
)
@click.pass_obj
def result(
    obj: _Context, task_id: str, timeout: float | None, no_wait: bool, show_traceback: bool
) -> None:
    """Print the result of TASK_ID (or its error)."""
    res = obj.app.AsyncResult(task_id)
    try:
        if no_wait and not res.ready():
            click.echo(res.state)
            return
        value = res.get(timeout=timeout, propagate=False)
    except CeleriacError as exc:
        raise click.ClickException(str(exc)) from None
    if res.failed() or isinstance(value, BaseException):
        if show_traceback and res.traceback:
            click.echo(res.traceback, err=True)
        raise click.ClickException(f"{res.state}: {type(value).__name__}: {value}")
    click.echo(json.dumps(value) if _jsonable(value) else repr(value))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@main.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: task_default_queue).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(obj: _Context, queues: str | None, force: bool) -> None:
    """Delete every waiting message of the queues."""
    app = obj.app
    names = (
        [q.strip() for q in queues.split(",") if q.strip()]
        if queues
        else [app.conf.task_default_queue]
    )
    if not force:
        click.confirm(f"Delete all waiting messages of {', '.join(names)}?", abort=True)
    try:
        count = app.run_sync(app.apurge(names))
    except CeleriacError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Purged {count} message{'s' if count != 1 else ''} from {', '.join(names)}.")
