"""celeriac and the real Celery, side by side, in one run on one machine: ``python -m benchmarks``.

Both projects run the same tasks (:mod:`benchmarks.apps`) on the same broker and result store, one
worker process each, started by their own command lines (``celeriac -A ... worker`` and ``celery
-A ... worker``, both ``--loglevel=warning``), one after the other, never at the same time.

Scenarios (each in :mod:`benchmarks.scenarios`, with its exact method in its docstring):

1. **drain** — N ``add`` tasks pre-queued, then one worker; tasks/s from first to last completion.
2. **enqueue** — N ``.delay()`` calls in a loop, and one ``group(...).apply_async()`` of N.
3. **round trip** — ``.delay().get()`` in sequence with a worker running; p50 and p99.
4. **I/O-bound** — 5,000 tasks sleeping 100 ms at concurrency 500; share of the ceiling, peak RSS.
5. **memory** — worker RSS idle, and its growth after 100,000 tasks.

How completions are timed: every result document carries ``date_done``, written by the worker
(Celery and celeriac alike: ISO-8601 UTC with microseconds, taken as the result is built). After a
run the benchmark reads the stored documents and takes the first and last ``date_done``, so the
figure is what the worker did, not when the benchmark noticed. While a run goes on, the benchmark
only checks every 100 ms whether a sample of ~200 result keys exists (one ``EXISTS`` command on
Redis, one indexed ``SELECT`` on SQLite), which costs the worker next to nothing.

What is measured, and on what:

* Results are stored for every task in both projects (json). On Redis both use Redis for messages
  and results; on RabbitMQ both store results in the same Redis (not ``rpc://``), so a RabbitMQ row
  differs from the Redis row by the broker only; SQLite is celeriac's embedded default (Celery has
  no SQLite broker to compare with).
* celeriac runs with its defaults: acks after the task and its stored result (at-least-once),
  publisher confirms on RabbitMQ, leases on Redis and SQLite; threads pool, ``-c`` = CPUs.
* Celery runs with its defaults (acks before the task, no publisher confirms), remote control,
  events, gossip, mingle and heartbeats off; every pool it offers without extra packages is tried
  (solo, prefork -c 2, threads) and the best is reported, the others are in the JSON.
* Redis: database 10 (``BENCH_REDIS_URL``); RabbitMQ: ``BENCH_AMQP_URL``. Every measurement uses a
  queue of its own and deletes its queue, messages and results afterwards; nothing is flushed.
* Each worker is stopped by its pid at the end of its measurement, and every worker still running
  when the run ends (error, timeout, Ctrl-C, SIGTERM) is stopped too. A measurement with no
  progress for 30 s is abandoned, the table shows N/A and the run goes on.
"""
