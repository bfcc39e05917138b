"""The two benchmark apps: the same task names in celeriac and in the real Celery.

Worker processes import them by ``-A benchmarks.apps.celeriac_app`` / ``-A
benchmarks.apps.celery_app`` and read their configuration from ``BENCH_*`` environment variables
(:mod:`benchmarks.apps.config`); the benchmark process builds its client apps with the same
settings by calling ``build_app``.
"""
