"""The one place a SparkSession is built.

Delta Lake's SQL extension and catalog are always configured. Where the JVM is
started from Python (tests, notebooks), the Delta jars come from the local
folder that ``bin/setup`` fills (``.jars/``, or ``$MIGRALAKE_JARS``). Under
``spark-submit`` the launcher passes them (``--jars`` locally, ``--packages``
on a cluster) and this module only adds the session settings.

Reads and writes no tables.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, cast

import pandas as pd
from pyspark.sql import DataFrame, Row, SparkSession

from lib.config import PROJECT_ROOT, SparkSettings

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
LOG4J_CONF = PROJECT_ROOT / "conf" / "log4j2.properties"
log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The environment is not set up for Spark + Delta; the message says how to fix it."""


SETUP_HINT = (
    "Run `bin/setup` from the project root once (it needs network access the first time: PyPI "
    "and Maven Central); `./spark-submit.sh` and `./test.sh` run it for you. On a cluster, "
    "pass the jars with `./spark-submit.sh JOB -- --packages io.delta:delta-spark_4.1_2.13:4.4.0`."
)


def jar_dir() -> Path:
    return Path(os.environ.get("MIGRALAKE_JARS", PROJECT_ROOT / ".jars"))


def local_delta_jars() -> list[str]:
    """The resolved Delta jars, or a :class:`SetupError` saying how to resolve them."""
    folder = jar_dir()
    jars = sorted(str(p) for p in folder.glob("*.jar"))
    if not any(Path(j).name.startswith("delta-spark_") for j in jars):
        raise SetupError(f"Delta Lake jars not found in {folder}. {SETUP_HINT}")
    return jars


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands Python the gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _stderr_is_terminal() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


def get_spark(settings: SparkSettings | None = None, master: str | None = None) -> SparkSession:
    """Return the configured SparkSession (creating it on first use).

    ``master`` (from the command line) wins over ``settings.master``.
    """
    settings = settings or SparkSettings()
    builder = SparkSession.builder
    conf: dict[str, str] = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        # Python workers fork from our daemon, which can import a job's heavy modules once (lib/pydaemon.py).
        "spark.python.daemon.module": "lib.pydaemon",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        # Spark's progress bar redraws one line with carriage returns: right on a terminal, kilobytes of noise
        # in a log file. Long stages log their own progress lines (lib.runtime).
        "spark.ui.showConsoleProgress": str(settings.show_progress and _stderr_is_terminal()).lower(),
        "spark.ui.enabled": "false",
        # Executors also take the driver's later setLogLevel calls (their start-up configuration comes from
        # spark-submit.sh: conf/log4j2.properties).
        "spark.executor.syncLogLevel.enabled": "true",
        "spark.sql.warehouse.dir": str(PROJECT_ROOT / "build" / "spark-warehouse"),
        "spark.driver.extraJavaOptions": (
            f"-Dderby.system.home={PROJECT_ROOT / 'build'} -Dlog4j.configurationFile={LOG4J_CONF}"
        ),
        # Reconstructing a Delta snapshot uses this many tasks; Delta's default (50)
        # suits clusters, not 2-core machines.
        "spark.databricks.delta.snapshotPartitions": str(settings.delta_snapshot_partitions),
        # Delta: ordinary safety defaults, spelled out so reviewers see them.
        "spark.databricks.delta.replaceWhere.constraintCheck.enabled": "true",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
    }
    if not _launched_by_spark_submit():
        # Python workers use this interpreter (the project environment), not the system one.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # Under spark-submit its --name is the application's name; otherwise ours.
        builder = builder.master(master or settings.master).appName(settings.app_name)
        conf["spark.jars"] = ",".join(local_delta_jars())
        conf["spark.driver.memory"] = settings.driver_memory
    conf.update(settings.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - JVM start-up failures come in many types
        raise SetupError(f"could not start Spark: {exc}. {SETUP_HINT}") from exc
    spark.sparkContext.setLogLevel(settings.log_level)
    _check_delta_available(spark)
    return spark


def _check_delta_available(spark: SparkSession) -> None:
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - the only way to probe the classpath
    try:
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()  # type: ignore[union-attr]
        loader.loadClass(DELTA_EXTENSION)
    except Exception as exc:  # noqa: BLE001
        raise SetupError(f"Delta Lake classes are not on Spark's classpath. {SETUP_HINT}") from exc


def parallel_rows(spark: SparkSession, rows: list[tuple], schema: Any, per_core: int = 4) -> DataFrame:
    """Small driver-side work items (e.g. raster windows) as a DataFrame of a few partitions per core: each task
    pays a fixed start-up cost, so one task carries several items, and items alike in cost still balance."""
    slices = max(1, min(len(rows), spark.sparkContext.defaultParallelism * per_core))
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, slices), schema)


def one_row(df: DataFrame) -> Row:
    """The first row of a query that always has one (an aggregate); a clear error if it has none."""
    row = df.first()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def to_pandas(df: DataFrame) -> pd.DataFrame:
    """``df.toPandas()`` typed as a pandas DataFrame."""
    return cast(pd.DataFrame, df.toPandas())


def from_pandas(spark: SparkSession, frame: pd.DataFrame, schema: Any) -> DataFrame:
    """A Spark DataFrame from pandas with every missing value (NaN, NaT, None) as null."""
    return spark.createDataFrame(frame.astype(object).where(frame.notna(), None), schema=schema)
