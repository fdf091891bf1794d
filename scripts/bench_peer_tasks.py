"""Tasks for the peers of ``scripts/bench_peers.py`` (Ray, Dask distributed, Celery).

The same two tasks as ``scripts/bench_skills.py`` serves to zlink's nodes:
``noop`` returns its argument, ``wait`` sleeps (50 ms in the benchmark) and
returns its argument. Plain module-level functions, so that every peer sends
them by reference and its worker processes import this module:

- Ray: ``ray.remote(noop)`` for tasks and ``ray.remote(Waiter)`` for threaded
  actors; the workers find this module through the job's ``code_search_path``;
- Dask: ``client.map(noop, ...)``; the spawned workers inherit ``sys.path``;
- Celery: ``app`` (made on first use), started as ``celery -A
  bench_peer_tasks worker`` with this folder on ``PYTHONPATH``; the
  benchmark's driver sends by task name (``zlink_bench.noop``,
  ``zlink_bench.wait``) through a Celery app of its own.

Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: Celery task names (the benchmark process sends by name, so it never needs the worker's app)
CELERY_NOOP = "zlink_bench.noop"
CELERY_WAIT = "zlink_bench.wait"


def noop(x: Any) -> Any:
    """Return the argument unchanged (measures pure fabric overhead)."""
    return x


def wait(x: Any, seconds: float = 0.05) -> Any:
    """Sleep ``seconds`` (default 50 ms), then return the argument (parallel speed-up)."""
    time.sleep(seconds)
    return x


def worker_pid(_: Any = None) -> int:
    """The pid of the process that runs the task (to find the worker processes)."""
    return os.getpid()


class Waiter:
    """A Ray actor class: ``ray.remote(max_concurrency=N)(Waiter)`` runs N calls at once on threads."""

    def noop(self, x: Any) -> Any:
        return x

    def wait(self, x: Any, seconds: float = 0.05) -> Any:
        time.sleep(seconds)
        return x

    def pid(self) -> int:
        return os.getpid()


def make_celery_app() -> Any:
    """The workers' Celery app with both tasks; broker and backend come from their command line.

    Made on first use of ``bench_peer_tasks.app`` (as ``celery -A
    bench_peer_tasks`` does), so that importing this module never imports
    Celery.
    """
    from celery import Celery

    celery_app = Celery("zlink_bench_peers", set_as_current=False)
    celery_app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False, result_expires=600)
    celery_app.task(name=CELERY_NOOP)(noop)
    celery_app.task(name=CELERY_WAIT)(wait)
    return celery_app


def __getattr__(name: str) -> Any:
    if name == "app":
        globals()["app"] = made = make_celery_app()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
