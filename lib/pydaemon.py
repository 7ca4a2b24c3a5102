"""Spark's Python worker daemon, with modules imported once before workers are forked.

Spark starts one daemon per executor and Python environment
(``spark.python.daemon.module``, set to this module by ``lib.spark``); the
daemon forks a worker for each Python task slot. Anything imported here before
the fork is shared by every worker instead of being imported again by each:
heavy libraries such as torch and transformers take seconds per process.

A job asks for preloading through the environment of its Python functions
(``SparkContext.environment``, captured when a UDF is built; see
:func:`worker_environment`): ``MIGRALAKE_WORKER_PRELOAD`` names modules,
comma-separated; a named module that defines ``worker_preload()`` has it
called too (it reads its own settings from the same environment). For jobs
that set nothing it preloads nothing and is Spark's plain daemon. A preload that fails is reported on
stderr and skipped: the worker then imports what it needs itself and reports
any real error from the task.

Nothing may be written to stdout before the daemon hands over to Spark's
manager: Spark reads the daemon's port from it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

PRELOAD_ENV = "MIGRALAKE_WORKER_PRELOAD"


def preload(names: str) -> list[str]:
    """Import each module named in ``names`` (comma-separated) and run its ``worker_preload``; return what loaded."""
    done = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
            hook = getattr(module, "worker_preload", None)
            if callable(hook):
                hook()
        except Exception as exc:  # noqa: BLE001 - a failed preload must not stop the daemon
            print(f"migralake worker daemon: preloading {name} failed ({type(exc).__name__}: {exc}); "
                  "workers will load it themselves", file=sys.stderr)
            continue
        done.append(name)
        print(f"migralake worker daemon: preloaded {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return done


@contextlib.contextmanager
def worker_environment(spark: Any, values: Mapping[str, str]) -> Iterator[None]:
    """Python functions built inside this block run in workers with ``values`` in their environment.

    Spark keys its daemons by that environment, so such functions get a daemon of
    their own (started on first use, preloading what ``values`` names); functions
    built outside keep the ordinary one.
    """
    env = spark.sparkContext.environment
    saved = {k: env.get(k) for k in values}
    env.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v


def main() -> None:
    names = os.environ.get(PRELOAD_ENV, "")
    if names:
        preload(names)
    from pyspark.daemon import manager

    manager()


if __name__ == "__main__":
    main()
