"""Job runtime: logging set-up and per-stage records (rows in / rows out / seconds).

Every job logs one line per stage on the ``migralake`` logger; the summary of
all stages is returned to the CLI, which prints it at the end of the run.

Reads and writes no tables.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("migralake")


class JobFailed(RuntimeError):
    """A job cannot go on for a reason its user can act on; the CLI prints the message (no traceback)
    and exits with ``exit_code``. Whatever the job could record first (quarantine rows) is written."""

    exit_code = 4


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger("migralake")
    if not any(getattr(h, "_migralake", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._migralake = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


@dataclass
class StageRecord:
    name: str
    rows_in: int | None = None
    rows_out: int | None = None
    seconds: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        def fmt(n: int | None) -> str:
            return "-" if n is None else f"{n:,}"

        extra = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (
            f"stage {self.name:<32} rows_in={fmt(self.rows_in):>12} rows_out={fmt(self.rows_out):>12} "
            f"seconds={self.seconds:7.1f}{extra}"
        )


@dataclass
class RunLog:
    """The stages of one job run, in order."""

    stages: list[StageRecord] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, rows_in: int | None = None) -> Iterator[StageRecord]:
        record = StageRecord(name=name, rows_in=rows_in)
        start = time.perf_counter()
        log.info("stage %s: started", name)
        done = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(name, start, done), name=f"progress {name}", daemon=True)
        beat.start()
        sc = _spark_context()
        previous = sc.getLocalProperty("spark.job.description") if sc else None
        if sc:  # the stage names its Spark jobs (thread-local): event logs and the Spark UI say what ran
            sc.setJobDescription(name)
        try:
            yield record
        finally:
            if sc:
                sc.setJobDescription(previous)  # type: ignore[arg-type]
            done.set()
            record.seconds = time.perf_counter() - start
            self.stages.append(record)
            log.info(record.line())


def _spark_context() -> Any:
    """The running SparkContext, if any (stages also run outside Spark); the process's one, from any thread."""
    try:
        from pyspark import SparkContext
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return None
    return SparkContext._active_spark_context  # noqa: SLF001


RUN = RunLog()

PROGRESS_ENV = "MIGRALAKE_PROGRESS_SECONDS"


def progress_interval() -> float:
    """Seconds between the progress lines of a running stage (``$MIGRALAKE_PROGRESS_SECONDS``, default 30;
    0 turns them off)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, "30")))
    except ValueError:
        return 30.0


def spark_progress() -> str:
    """What the active SparkContext is doing, e.g. ``Spark stage 14: 3 of 8 tasks done, 2 running``; empty
    when no Spark job runs. Plain text, one line: the same in a terminal and in a log file."""
    try:
        sc = _spark_context()
        if sc is None:
            return ""
        tracker = sc.statusTracker()
        parts = []
        for sid in sorted(tracker.getActiveStageIds()):
            info = tracker.getStageInfo(sid)
            if info is not None:
                parts.append(f"Spark stage {sid}: {info.numCompletedTasks} of {info.numTasks} tasks done, "
                             f"{info.numActiveTasks} running")
        return "; ".join(parts)
    except Exception:  # noqa: BLE001 - progress is best effort; the stage's own outcome is what counts
        return ""


def _heartbeat(name: str, start: float, done: threading.Event) -> None:
    interval = progress_interval()
    if interval <= 0:
        return
    while not done.wait(interval):
        spark = spark_progress()
        log.info("stage %s: running for %.0f s%s", name, time.perf_counter() - start, f" ({spark})" if spark else "")


def stage(name: str, rows_in: int | None = None):  # type: ignore[no-untyped-def]
    """``with stage("cdr.ingest", rows_in=n) as st: ...; st.rows_out = m`` logs one line."""
    return RUN.stage(name, rows_in)


@dataclass(frozen=True)
class Write:
    """One of several independent writes: a stage name, the work (returns rows written), rows in."""

    stage: str
    work: Callable[[], int | None]
    rows_in: int | None = None


def side_by_side(writes: Sequence[Write], max_workers: int) -> dict[str, int | None]:
    """Run independent writes in threads, as concurrent Spark jobs, each logged as its own stage, so the cores
    are not idle during one table's commit; waits for all and re-raises the first failure. Returns the rows
    each wrote, by stage name."""
    from concurrent.futures import ThreadPoolExecutor

    def one(w: Write) -> int | None:
        with stage(w.stage, w.rows_in) as st:
            st.rows_out = w.work()
            return st.rows_out

    if not writes:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(writes))),
                            thread_name_prefix="migralake-write") as pool:
        futures = [(w.stage, pool.submit(one, w)) for w in writes]
        return {name: f.result() for name, f in futures}
