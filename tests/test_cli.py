"""./spark-submit.sh as a user runs it: help, clear errors, a real local job as a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = str(ROOT / "spark-submit.sh")


def submit(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([SUBMIT, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def test_help_lists_every_job() -> None:
    from jobs import JOBS

    out = submit("--help")
    assert out.returncode == 0
    for name, (_, description) in JOBS.items():
        assert f"{name}" in out.stdout and description in out.stdout


def test_help_and_a_wrong_job_need_no_set_up(tmp_path: Path) -> None:
    # An environment and jars that do not exist: answering must not build or use them.
    env = {"MIGRALAKE_VENV": str(tmp_path / "no-venv"), "MIGRALAKE_JARS": str(tmp_path / "no-jars")}
    helped = submit("--help", env=env, timeout=30)
    assert helped.returncode == 0 and "cdr.ingest" in helped.stdout
    wrong = submit("cdr.ingets", env=env, timeout=30)
    assert wrong.returncode == 2 and "Did you mean 'cdr.ingest'?" in wrong.stderr
    assert not (tmp_path / "no-venv").exists() and not (tmp_path / "no-jars").exists()


def test_unknown_job_is_a_clear_error() -> None:
    out = submit("cdr.ingets")
    assert out.returncode == 2
    assert "unknown job 'cdr.ingets'. Did you mean 'cdr.ingest'?" in out.stderr


def test_bad_set_is_a_clear_error_before_spark() -> None:
    out = submit("tables", "--set", "spark.shuffle_partitions=lots")
    assert out.returncode == 2
    assert "--set spark.shuffle_partitions=lots: spark.shuffle_partitions" in out.stderr
    assert "SparkContext" not in out.stderr


def test_job_without_arguments_refuses_extra_ones() -> None:
    out = submit("tables", "surprise")
    assert out.returncode == 2 and "takes no arguments" in out.stderr


@pytest.mark.slow
def test_runs_a_job_locally_through_spark_submit(tmp_path: Path) -> None:
    out = submit("tables", "--set", f"lakehouse.root={tmp_path / 'lh'}", "--master", "local[1]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bronze.cdr_events" in out.stdout and "(not yet)" in out.stdout
    logs = out.stdout + out.stderr  # spark-submit merges the driver's stderr into stdout
    assert "job tables: done" in logs
    assert "master=local[1]" in logs
    assert "\r" not in logs, "a carriage-return progress bar in a non-terminal run"


def test_an_unreachable_master_fails_at_once_with_a_hint() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    out = submit("tables", "--master", f"spark://127.0.0.1:{port}", timeout=60)
    assert out.returncode == 1
    assert f"no Spark master answers at spark://127.0.0.1:{port}" in out.stderr
    assert "bin/cluster start" in out.stderr and "Traceback" not in out.stderr


def test_a_long_stage_logs_plain_progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import time

    from lib.runtime import PROGRESS_ENV, RunLog

    monkeypatch.setenv(PROGRESS_ENV, "0.2")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("migralake")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with RunLog().stage("slow.stage") as st:
            time.sleep(0.9)
            st.rows_out = 5
        time.sleep(0.5)  # no progress line once the stage is over
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    beats = [m for m in seen if m.startswith("stage slow.stage: running for")]
    assert len(beats) >= 3, seen
    assert seen.index(beats[-1]) < next(i for i, m in enumerate(seen) if "rows_out=" in m), seen
    assert all("\r" not in m and "\n" not in m for m in seen)
