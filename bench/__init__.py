"""Huitou's benchmark suite: `python -m bench [smoke|quick|full]`.

Each path (ingest, lifecycle, end to end, timers, memory, and Celery for comparison) is
measured against the raw limit of the components underneath it, in the same run on the
same machine, and reported as a ratio. See `bench/README.md`.
"""
