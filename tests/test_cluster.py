"""A real Spark standalone cluster on loopback (bin/cluster: one master, two one-core workers), a job
submitted to it with ./spark-submit.sh as a user does: offline (the jars of .jars, no --packages), executors
on the environment packed by bin/pack-env (never the checkout's), the application named by the script,
executors logging at the quiet level, progress as plain lines."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # type: ignore[no-untyped-def]
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "MIGRALAKE_CLUSTER_DIR": str(state)}
    port = free_port()
    started = run(str(ROOT / "bin" / "cluster"), "start", "--workers", "2", "--cores", "1", "--memory", "1500m",
                  "--port", str(port), env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    url = f"spark://127.0.0.1:{port}"
    assert started.stdout.startswith(url)
    try:
        yield url, state, env
    finally:
        stopped = run(str(ROOT / "bin" / "cluster"), "stop", env=env, timeout=120)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The executors' environment without torch (the CDR demo does not need it; the full one is measured in
    the README)."""
    out = tmp_path_factory.mktemp("env") / "migralake-env.tar.gz"
    made = run(str(ROOT / "bin" / "pack-env"), "--without-torch", "--out", str(out), env=dict(os.environ),
               timeout=1200)
    assert made.returncode == 0, made.stderr[-3000:]
    assert made.stdout.strip() == str(out) and out.stat().st_size > 100 << 20
    listing = subprocess.run(["tar", "-tzf", str(out)], capture_output=True, text=True, check=True).stdout
    names = listing.split("\n")
    assert "bin/python" in names and "pyvenv.cfg" in names and not any(n.startswith(("./", "/")) for n in names)
    assert "site-packages/lib/pydaemon.py" in listing and "site-packages/torch/" not in listing
    assert ".dist-info/direct_url.json" not in listing  # no record of the build folder
    return out


def test_a_job_runs_on_two_workers_offline_with_its_name_and_quiet_logs(cluster, packed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, state, env = cluster
    status = run(str(ROOT / "bin" / "cluster"), "status", env=env)
    assert status.returncode == 0 and "2 worker(s)" in status.stdout, status.stdout + status.stderr
    lake = tmp_path / "lake"
    job_env = {**env, "MIGRALAKE_PSEUDONYM_KEY": "cluster-test-key-0123456789abcdef",
               "MIGRALAKE_PROGRESS_SECONDS": "5",
               # Executors run ./environment/bin/python from the archive; any other Python would be this one.
               "MIGRALAKE_EXECUTOR_ENV": str(packed), "PYSPARK_PYTHON": "/nonexistent/python",
               # No Ivy or Maven: a resolver that was asked would fail here.
               "SPARK_SUBMIT_OPTS": f"-Divy.home={tmp_path / 'no-ivy'}"}
    out = run(str(ROOT / "spark-submit.sh"), "demo", "--master", url,
              "--set", f"lakehouse.root={lake}", "--set", f"demo.input_dir={tmp_path / 'inputs'}",
              "--set", "demo.pipelines=[cdr]", "--set", "demo.n_subscribers=300", "--set", "demo.n_days=6",
              "--set", "demo.event_day=3", "--set", f"lakehouse.exports_dir={tmp_path / 'exports'}",
              "--set", f"lakehouse.reports_dir={tmp_path / 'reports'}",
              "--set", "spark.driver_memory=1g", env=job_env, timeout=900)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-5000:]
    assert f"master={url}" in logs
    assert "driver_memory=1g" in logs
    assert "migralake demo finished" in out.stdout and "verify: PASSED" in out.stdout
    assert not (tmp_path / "no-ivy").exists(), "spark-submit resolved packages; the cluster run must be offline"
    assert "\r" not in logs, "progress bar written to a non-terminal"
    # The master registered the application under the script's name, and both workers ran its executors.
    master_log = "".join(p.read_text() for p in (state / "logs").glob("*Master*.out"))
    assert "Registering app migralake-demo" in master_log
    apps = sorted((state / "work").glob("app-*"))
    assert apps, "no application ran on the workers"
    executors = [d for d in apps[-1].iterdir() if d.is_dir()]
    assert len(executors) == 2
    for d in executors:
        assert (d / "environment" / "bin" / "python").exists(), sorted(p.name for p in d.iterdir())
        stderr = (d / "stderr").read_text()
        assert "Running task" not in stderr and "Finished task" not in stderr, stderr[-2000:]
