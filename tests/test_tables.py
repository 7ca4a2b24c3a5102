"""The table registry on real Delta tables: round trip, time travel, idempotence, constraints."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from lib.tables import Lakehouse, TableError, TableSpec, register, spec

MEASURES = register(
    TableSpec(
        name="silver.test_measures",
        schema=T.StructType(
            [
                T.StructField("date", T.DateType(), False),
                T.StructField("unit", T.StringType(), False),
                T.StructField("n_subscribers", T.LongType(), False),
            ]
        ),
        description="test table",
        source="tests",
        owner_job="tests",
        partition_by=("date",),
        period_column="date",
        keys=("date", "unit"),
        constraints={"count_at_least_one": "n_subscribers >= 1"},
    )
)


def rows(spark: SparkSession, data: list[tuple[date, str, int]]):  # type: ignore[no-untyped-def]
    return spark.createDataFrame(data, schema=MEASURES.schema)


def content(lake: Lakehouse, **kw) -> list[tuple]:  # type: ignore[no-untyped-def]
    return sorted(tuple(r) for r in lake.read("silver.test_measures", **kw).collect())


D1, D2, D3 = date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)


def test_round_trip_time_travel_and_history(spark: SparkSession, lake: Lakehouse) -> None:
    first = lake.write(rows(spark, [(D1, "a", 20), (D2, "a", 30)]), "silver.test_measures")
    assert first.rows_written == 2
    assert content(lake) == [(D1, "a", 20), (D2, "a", 30)]
    t_between = time.time()
    time.sleep(1.1)  # Delta timestamps have millisecond resolution; keep versions apart
    second = lake.write(rows(spark, [(D3, "b", 40)]), "silver.test_measures", mode="append")
    assert second.version == first.version + 1
    assert content(lake) == [(D1, "a", 20), (D2, "a", 30), (D3, "b", 40)]
    assert content(lake, version=first.version) == [(D1, "a", 20), (D2, "a", 30)]
    # millisecond precision: truncating to the second can land before the first write's commit
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_between)) + f".{int(t_between * 1000) % 1000:03d}"
    assert content(lake, timestamp=ts) == [(D1, "a", 20), (D2, "a", 30)]
    history = lake.history("silver.test_measures").orderBy("version").collect()
    # create (with properties and the CHECK constraint), write, append
    assert [h["version"] for h in history] == [0, 1, 2]
    assert [h["operation"] for h in history][1:] == ["WRITE", "WRITE"]
    props = lake.properties("silver.test_measures")
    assert props["migralake.layer"] == "silver" and props["migralake.owner_job"] == "tests"
    assert props["delta.constraints.count_at_least_one"] == "n_subscribers >= 1"
    assert Path(lake.location("silver.test_measures")).parts[-2:] == ("silver", "test_measures")


def test_rerunning_a_period_replaces_it(spark: SparkSession, lake: Lakehouse) -> None:
    lake.write(rows(spark, [(D1, "a", 20), (D2, "a", 30), (D3, "a", 50)]), "silver.test_measures")
    rerun = rows(spark, [(D2, "a", 31), (D2, "b", 17)])
    lake.write(rerun, "silver.test_measures", period=(D2, D2))
    after_first = content(lake)
    lake.write(rerun, "silver.test_measures", period=(D2, D2))
    assert content(lake) == after_first == [(D1, "a", 20), (D2, "a", 31), (D2, "b", 17), (D3, "a", 50)]


def test_write_outside_the_period_is_rejected(spark: SparkSession, lake: Lakehouse) -> None:
    lake.write(rows(spark, [(D1, "a", 20)]), "silver.test_measures")
    with pytest.raises(Exception, match="(?i)replaceWhere|does not conform|DELTA_REPLACE_WHERE"):
        lake.write(rows(spark, [(D3, "a", 99)]), "silver.test_measures", period=(D1, D2))
    assert content(lake) == [(D1, "a", 20)]


def test_check_constraint_rejects_and_leaves_table_unchanged(spark: SparkSession, lake: Lakehouse) -> None:
    lake.write(rows(spark, [(D1, "a", 20)]), "silver.test_measures")
    version = lake.version("silver.test_measures")
    with pytest.raises(Exception, match="count_at_least_one"):
        lake.write(rows(spark, [(D2, "a", 5), (D2, "b", 0)]), "silver.test_measures", mode="append")
    assert content(lake) == [(D1, "a", 20)]
    assert lake.version("silver.test_measures") == version


def test_existing_table_gets_a_missing_constraint_after_checking_its_rows(spark: SparkSession,
                                                                         lake: Lakehouse) -> None:
    # a table written before the constraint was registered: ensure() adds it with ALTER TABLE, which checks
    # the rows already there
    location = lake.location("silver.test_measures")
    rows(spark, [(D1, "a", 20)]).write.format("delta").partitionBy("date").save(location)
    lake.ensure("silver.test_measures")
    assert lake.properties("silver.test_measures")["delta.constraints.count_at_least_one"] == "n_subscribers >= 1"
    assert lake.history("silver.test_measures", limit=1).first()["operation"] == "ADD CONSTRAINT"
    with pytest.raises(Exception, match="count_at_least_one"):
        lake.write(rows(spark, [(D2, "b", 0)]), "silver.test_measures", mode="append")
    # and refuses to add it over rows that break it
    lake.delete_path(location)
    rows(spark, [(D1, "a", 0)]).write.format("delta").partitionBy("date").save(location)
    with pytest.raises(Exception, match="(?i)count_at_least_one|violate"):
        lake.ensure("silver.test_measures")
    assert "delta.constraints.count_at_least_one" not in lake.properties("silver.test_measures")


def test_write_results_come_from_the_commit_log(spark: SparkSession, lake: Lakehouse) -> None:
    first = lake.write(rows(spark, [(D1, "a", 20), (D2, "a", 30), (D3, "a", 50)]), "silver.test_measures")
    second = lake.write(rows(spark, [(D2, "b", 7)]), "silver.test_measures", period=(D2, D2))
    history = {h["version"]: h for h in lake.history("silver.test_measures").collect()}
    assert lake.version("silver.test_measures") == max(history) == second.version == first.version + 1
    assert (first.rows_written, first.operation) == (3, "WRITE")
    assert second.rows_written == int(history[second.version]["operationMetrics"]["numOutputRows"]) == 1
    assert lake.commit_info("silver.test_measures", second.version)["operation"] == history[second.version][
        "operation"] == second.operation
    n_deleted = lake.delete("silver.test_measures", {"date": D3})
    assert n_deleted == 1 and lake.version("silver.test_measures") == second.version + 1


def test_changed_partitions_read_from_the_log(spark: SparkSession, lake: Lakehouse) -> None:
    v0 = lake.write(rows(spark, [(D1, "a", 20), (D2, "a", 30)]), "silver.test_measures").version
    lake.write(rows(spark, [(D2, "b", 7)]), "silver.test_measures", period=(D2, D2))
    v2 = lake.write(rows(spark, [(D3, "c", 9)]), "silver.test_measures", mode="append").version
    assert lake.changed_partitions("silver.test_measures", "date", v0) == {D2.isoformat(), D3.isoformat()}
    assert lake.changed_partitions("silver.test_measures", "date", v0, v0 + 1) == {D2.isoformat()}
    assert lake.changed_partitions("silver.test_measures", "date", v2) == set()
    # a commit file removed (log clean-up): the caller cannot tell what changed
    (Path(lake.location("silver.test_measures")) / "_delta_log" / f"{v0 + 1:020d}.json").unlink()
    assert lake.changed_partitions("silver.test_measures", "date", v0, v2) is None
    with pytest.raises(TableError, match="not a partition column"):
        lake.changed_partitions("silver.test_measures", "unit", v0)


def test_a_constraint_dropped_between_writes_is_put_back(spark: SparkSession, lake: Lakehouse) -> None:
    # An insider (or another tool) drops the CHECK constraint after this process last looked at the table: the
    # next write through the registry sees the new version, adds the constraint again and rejects the row.
    lake.write(rows(spark, [(D1, "a", 20)]), "silver.test_measures")
    lake.write(rows(spark, [(D2, "a", 21)]), "silver.test_measures", mode="append")
    spark.sql(f"ALTER TABLE delta.`{lake.location('silver.test_measures')}` DROP CONSTRAINT count_at_least_one")
    assert "delta.constraints.count_at_least_one" not in lake.properties("silver.test_measures")
    with pytest.raises(Exception, match="count_at_least_one"):
        lake.write(rows(spark, [(D3, "b", 0)]), "silver.test_measures", mode="append")
    assert content(lake) == [(D1, "a", 20), (D2, "a", 21)]
    assert lake.properties("silver.test_measures")["delta.constraints.count_at_least_one"] == "n_subscribers >= 1"


def weaken_the_rule(spark: SparkSession, lake: Lakehouse) -> str:
    """One row written, then the table's count_at_least_one rule swapped for a weaker one under the same name (what
    an insider with write access to the table can do outside the registry); the table's location."""
    loc = lake.location("silver.test_measures")
    lake.write(rows(spark, [(D1, "a", 20)]), "silver.test_measures")
    spark.sql(f"ALTER TABLE delta.`{loc}` DROP CONSTRAINT count_at_least_one")
    spark.sql(f"ALTER TABLE delta.`{loc}` ADD CONSTRAINT count_at_least_one CHECK (n_subscribers >= 0)")
    return loc


def test_a_constraint_weakened_under_its_own_name_is_put_back(spark: SparkSession, lake: Lakehouse) -> None:
    # A check for the rule's name alone passes: the next write through the registry compares the rule itself,
    # restores it and rejects the row.
    weaken_the_rule(spark, lake)
    with pytest.raises(Exception, match="count_at_least_one"):
        lake.write(rows(spark, [(D2, "b", 0)]), "silver.test_measures", mode="append")
    assert content(lake) == [(D1, "a", 20)]
    assert lake.properties("silver.test_measures")["delta.constraints.count_at_least_one"] == "n_subscribers >= 1"


def test_a_registered_rule_the_rows_break_is_refused_by_name(spark: SparkSession, lake: Lakehouse) -> None:
    # The table's rule is weaker than the registered one and a row already there breaks the registered rule:
    # the write stops with an error naming the table and the rule, and the table keeps its rows and its rule.
    loc = weaken_the_rule(spark, lake)
    spark.sql(f"INSERT INTO delta.`{loc}` VALUES (DATE'2024-03-02', 'b', 0)")
    with pytest.raises(TableError, match="silver.test_measures: rows already there violate the registered rule "
                                         "count_at_least_one"):
        lake.write(rows(spark, [(D3, "c", 5)]), "silver.test_measures", mode="append")
    assert content(lake) == [(D1, "a", 20), (D2, "b", 0)]
    assert lake.properties("silver.test_measures")["delta.constraints.count_at_least_one"] == "n_subscribers >= 0"


def test_failed_first_write_leaves_no_table(spark: SparkSession, lake: Lakehouse) -> None:
    with pytest.raises(Exception, match="count_at_least_one"):
        lake.write(rows(spark, [(D1, "a", 0)]), "silver.test_measures")
    assert not lake.exists("silver.test_measures")
    assert not Path(lake.location("silver.test_measures")).exists()


def test_schema_mismatch_is_named(spark: SparkSession, lake: Lakehouse) -> None:
    df = spark.createDataFrame([(D1, "a", 1.5)], "date date, unit string, n double")
    with pytest.raises(TableError) as err:
        lake.write(df, "silver.test_measures")
    msg = str(err.value)
    assert "silver.test_measures" in msg
    assert "missing column 'n_subscribers' (bigint)" in msg and "unexpected column 'n'" in msg
    assert not lake.exists("silver.test_measures")


def test_merge_is_idempotent(spark: SparkSession, lake: Lakehouse) -> None:
    lake.write(rows(spark, [(D1, "a", 20)]), "silver.test_measures")
    upd = rows(spark, [(D1, "a", 21), (D2, "b", 30)])
    lake.merge(upd, "silver.test_measures")
    lake.merge(upd, "silver.test_measures")
    assert content(lake) == [(D1, "a", 21), (D2, "b", 30)]


def test_unknown_table_suggests_names(lake: Lakehouse) -> None:
    with pytest.raises(TableError, match="did you mean silver.test_measures"):
        spec("silver.test_measure")
    with pytest.raises(TableError, match="does not exist yet"):
        lake.read("silver.test_measures")


def test_bad_specs_are_refused() -> None:
    schema = T.StructType([T.StructField("x", T.LongType())])
    with pytest.raises(TableError, match="layer"):
        TableSpec(name="platinum.x", schema=schema, description="", source="", owner_job="")
    with pytest.raises(TableError, match="column 'y'"):
        TableSpec(name="gold.x", schema=schema, description="", source="", owner_job="", partition_by=("y",))


def test_an_older_table_gains_new_nullable_columns_and_refuses_other_changes(
    spark: SparkSession, lake: Lakehouse
) -> None:
    from lib import tables

    base = [("date", T.DateType(), False), ("unit", T.StringType(), False)]

    def spec_with(*extra: tuple[str, T.DataType, bool]) -> TableSpec:
        fields = [T.StructField(n, t, nl) for n, t, nl in (*base, *extra)]
        return TableSpec(name="silver.test_evolving", schema=T.StructType(fields), description="", source="tests",
                         owner_job="tests", period_column="date")

    try:
        tables._REGISTRY["silver.test_evolving"] = spec_with()  # noqa: SLF001
        lake.write(spark.createDataFrame([(date(2024, 1, 1), "A")], "date date, unit string"),
                   "silver.test_evolving", mode="append")
        tables._REGISTRY["silver.test_evolving"] = spec_with(("share", T.DoubleType(), True))  # noqa: SLF001
        lake.write(spark.createDataFrame([(date(2024, 1, 2), "B", 0.5)], "date date, unit string, share double"),
                   "silver.test_evolving", mode="append")
        got = sorted(map(tuple, lake.read("silver.test_evolving").collect()))
        assert got == [(date(2024, 1, 1), "A", None), (date(2024, 1, 2), "B", 0.5)]
        tables._REGISTRY["silver.test_evolving"] = spec_with(("share", T.StringType(), True))  # noqa: SLF001
        with pytest.raises(TableError, match=r"older schema: column 'share' is double, registered as string"):
            lake.ensure("silver.test_evolving")
    finally:
        tables._REGISTRY.pop("silver.test_evolving", None)  # noqa: SLF001
