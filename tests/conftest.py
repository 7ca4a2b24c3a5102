"""Shared fixtures: one local[2] SparkSession with Delta for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pyspark.sql import SparkSession

from lib.config import SparkSettings
from lib.spark import get_spark
from lib.tables import Lakehouse


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    settings = SparkSettings(
        master="local[2]",
        app_name="migralake-tests",
        shuffle_partitions=2,
        delta_snapshot_partitions=1,
        driver_memory="2g",
        show_progress=False,
        conf={"spark.sql.adaptive.coalescePartitions.initialPartitionNum": "2"},
    )
    session = get_spark(settings)
    yield session
    session.stop()


@pytest.fixture()
def lake(spark: SparkSession, tmp_path) -> Lakehouse:  # type: ignore[no-untyped-def]
    return Lakehouse(spark, str(tmp_path / "lakehouse"))
