"""Table registry and the one module that owns Delta and storage details.

Every table has a logical name ``<layer>.<table>`` (``bronze.cdr_events``,
``gold.cdr_od_daily``) and a :class:`TableSpec`: schema, partition columns,
the column that defines a *period* for idempotent re-runs, Delta CHECK
constraints and table properties (layer, source, owner job). Jobs ask
:class:`Lakehouse` for ``write`` / ``read`` / ``history`` by logical name and
never spell a path or a format.

Writes are idempotent: writing a period replaces exactly that period of the
table (Delta ``replaceWhere``), so re-running a job never duplicates rows.
A failed first write leaves no table behind; a failed later write leaves the
table as it was (Delta commits are atomic).
"""

from __future__ import annotations

import difflib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.runtime import log

LAYERS = ("bronze", "silver", "gold", "quarantine", "exports", "audit")
Scope = Mapping[str, Any]  # {column: value, or a list of values}
Where = Scope | Sequence[Scope]  # one scope, or any of several


class TableError(ValueError):
    """A table operation that cannot proceed; the message names the table and the reason."""


@dataclass(frozen=True)
class TableSpec:
    """What a table is: its contract, not its location."""

    name: str
    schema: T.StructType
    description: str
    source: str
    owner_job: str
    partition_by: tuple[str, ...] = ()
    period_column: str | None = None
    scope_columns: tuple[str, ...] = ()  # columns that, with the period, identify one re-runnable slice
    keys: tuple[str, ...] = ()
    constraints: Mapping[str, str] = field(default_factory=dict)
    append_only: bool = False
    properties: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layer, _, table = self.name.partition(".")
        if layer not in LAYERS or not table or "." in table:
            raise TableError(f"table name '{self.name}': expected <layer>.<table> with layer in {LAYERS}")
        columns = set(self.schema.fieldNames())
        for col in (*self.partition_by, *self.keys, *self.scope_columns, *filter(None, [self.period_column])):
            if col not in columns:
                raise TableError(f"table {self.name}: column '{col}' is not in its schema")

    @property
    def layer(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def table(self) -> str:
        return self.name.split(".", 1)[1]

    def table_properties(self) -> dict[str, str]:
        props = {
            "migralake.layer": self.layer,
            "migralake.source": self.source,
            "migralake.owner_job": self.owner_job,
            "migralake.description": self.description,
        }
        if self.append_only:
            props["delta.appendOnly"] = "true"
        props.update(self.properties)
        return props


_REGISTRY: dict[str, TableSpec] = {}


def register(spec: TableSpec, *, replace: bool = False) -> TableSpec:
    """Add a table to the registry (the same spec twice is fine; a different one is an error
    unless ``replace``: export tables are declared from the policy at run time)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec and not replace:
        raise TableError(f"table {spec.name} is registered twice with different specs")
    _REGISTRY[spec.name] = spec
    return spec


def spec(name: str) -> TableSpec:
    """The registered spec for a logical name, or an error suggesting close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TableError(f"unknown table '{name}'{hint}") from None


def registered() -> list[TableSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


@dataclass(frozen=True)
class WriteResult:
    table: str
    version: int
    rows_written: int
    operation: str


def _sql_literal(value: Any) -> str:
    if isinstance(value, datetime):
        return f"TIMESTAMP'{value.isoformat(sep=' ')}'"
    if isinstance(value, date):
        return f"DATE'{value.isoformat()}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _same_rule(current: str | None, registered: str) -> bool:
    """A table's CHECK expression (as its properties hold it) is the registered one, spaces aside."""
    return current is not None and current.replace(" ", "") == registered.replace(" ", "")


def _quote(col: str) -> str:
    return "`" + col.replace("`", "``") + "`"


class StagingArea:
    """Context manager of :meth:`Lakehouse.staging`: yields the folder's location."""

    def __init__(self, lake: Lakehouse, job: str) -> None:
        self.lake, self.job = lake, job
        self.location = f"{lake.root}/_staging/{job}-{uuid.uuid4().hex}"

    def __enter__(self) -> str:
        fs, base = self.lake._hadoop_path(f"{self.lake.root}/_staging")  # noqa: SLF001
        if fs.exists(base):
            for status in fs.listStatus(base):
                name = status.getPath().getName()
                if name.startswith(f"{self.job}-"):
                    log.warning("staging: removing %s, left by a run of %s that did not finish", name, self.job)
                    fs.delete(status.getPath(), True)
        return self.location

    def __exit__(self, *exc: object) -> None:
        self.lake.delete_path(self.location)


class Lakehouse:
    """Delta tables under one root (a local folder or an object-store URI)."""

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root.rstrip("/")

    # ------------------------------------------------------------------ locations

    def location(self, name: str) -> str:
        s = spec(name)
        return f"{self.root}/{s.layer}/{s.table}"

    def _hadoop_path(self, location: str) -> tuple[Any, Any]:
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001
        path = jvm.org.apache.hadoop.fs.Path(location)  # type: ignore[union-attr]
        fs = path.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
        return fs, path

    def exists(self, name: str) -> bool:
        return DeltaTable.isDeltaTable(self.spark, self.location(name))

    # ------------------------------------------------------------------ creation

    def ensure(self, name: str) -> DeltaTable:
        """Create the table if needed (schema, partitions, properties, constraints); return it.

        A new table gets its CHECK constraints in the creating commit (Delta keeps
        them as ``delta.constraints.*`` properties; an empty table has nothing to
        validate). An existing table is brought to the registered schema, gets
        any missing constraint with ALTER TABLE ADD CONSTRAINT, which first checks
        the rows already there, and any rule that differs from the registered one
        swapped back the same way (if the rows break it: an error naming the
        table and the rule, and the table's own rule stays).
        """
        s = spec(name)
        location = self.location(name)
        new = not DeltaTable.isDeltaTable(self.spark, location)
        # An existing table already in its registered form (the usual case: every write calls this) is checked
        # from its log alone.
        if not new and self._is_registered_form(s, *self._log_metadata(name)):
            return DeltaTable.forPath(self.spark, location)
        builder = DeltaTable.createIfNotExists(self.spark).location(location).addColumns(s.schema)
        builder = builder.comment(s.description)
        if s.partition_by:
            builder = builder.partitionedBy(*s.partition_by)
        for key, value in s.table_properties().items():
            builder = builder.property(key, value)
        if new:
            for cname, expr in s.constraints.items():
                builder = builder.property(f"delta.constraints.{cname.lower()}", expr)
        table = builder.execute()
        self._evolve(name, table)
        present = self.properties(name)
        for cname, expr in s.constraints.items():
            current = present.get(f"delta.constraints.{cname.lower()}")
            if current is None:
                self.spark.sql(f"ALTER TABLE delta.`{location}` ADD CONSTRAINT {cname} CHECK ({expr})")
            elif not _same_rule(current, expr):
                # The rule was changed: in the registry (a new release threshold), or in the table by someone
                # else (a weaker rule under the same name). The registered rule goes back, if the rows allow.
                self.spark.sql(f"ALTER TABLE delta.`{location}` DROP CONSTRAINT {cname}")
                try:
                    self.spark.sql(f"ALTER TABLE delta.`{location}` ADD CONSTRAINT {cname} CHECK ({expr})")
                except Exception as exc:  # noqa: BLE001 - rows already there violate the registered rule
                    self.spark.sql(f"ALTER TABLE delta.`{location}` ADD CONSTRAINT {cname} CHECK ({current})")
                    raise TableError(f"{name}: rows already there violate the registered rule {cname} "
                                     f"'{expr}' (the table has '{current}'): {exc}") from None
        return table

    def _log_metadata(self, name: str) -> tuple[T.StructType, dict[str, str]]:
        """An existing table's latest schema and properties, from its Delta snapshot's metadata on the driver:
        no SQL statement to analyse (CREATE TABLE IF NOT EXISTS, SHOW TBLPROPERTIES), which on a warm driver
        halves the cost of ensure() and properties() on an existing table."""
        metadata = self._snapshot(name).metadata()
        schema = T.StructType.fromJson(json.loads(metadata.schemaString()))
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001
        conf = jvm.scala.jdk.javaapi.CollectionConverters.asJava(metadata.configuration())  # type: ignore[union-attr]
        return schema, {str(k): str(conf.get(k)) for k in conf.keySet()}

    def _snapshot(self, name: str) -> Any:
        """The table's latest Delta snapshot (a JVM object), brought up to date from its log on the driver."""
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001
        log_ = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(  # type: ignore[union-attr]
            self.spark._jsparkSession, self.location(name))  # noqa: SLF001
        none = jvm.scala.Option.empty()  # type: ignore[union-attr]
        return log_.update(False, none, none)

    @staticmethod
    def _is_registered_form(s: TableSpec, schema: T.StructType, props: Mapping[str, str]) -> bool:
        """True when ensure() has nothing to do on a table of this schema and these properties: the registered
        columns, in order, of the registered types, and every registered constraint there with its registered rule."""
        have = [(f.name, f.dataType) for f in schema.fields]
        want = [(f.name, f.dataType) for f in s.schema.fields]
        return have == want and all(_same_rule(props.get(f"delta.constraints.{c.lower()}"), expr)
                                    for c, expr in s.constraints.items())

    def _evolve(self, name: str, table: DeltaTable) -> None:
        """Bring an existing table to the registered schema: new nullable columns are added
        (older rows read them as null); any other difference is an error naming it."""
        want = spec(name).schema
        have = {f.name: f for f in table.toDF().schema.fields}
        problems = [
            f"column '{f.name}' is {have[f.name].dataType.simpleString()}, registered as {f.dataType.simpleString()}"
            for f in want.fields if f.name in have and have[f.name].dataType != f.dataType
        ]
        problems += [f"column '{c}' is no longer registered" for c in have if c not in want.fieldNames()]
        added = [f for f in want.fields if f.name not in have]
        problems += [f"new column '{f.name}' is not nullable, so older rows cannot take it" for f in added
                     if not f.nullable]
        if problems:
            raise TableError(
                f"table {name} at {self.location(name)} has an older schema: " + "; ".join(problems)
                + ". Migrate it, or remove it and re-run its job."
            )
        if added:
            cols = ", ".join(f"{_quote(f.name)} {f.dataType.simpleString()}" for f in added)
            self.spark.sql(f"ALTER TABLE delta.`{self.location(name)}` ADD COLUMNS ({cols})")
            log.info("table %s: added columns %s", name, [f.name for f in added])

    def properties(self, name: str) -> dict[str, str]:
        """The table's properties as its Delta metadata holds them (``delta.constraints.*``, ``delta.appendOnly``,
        ``migralake.*``, ...), read from the log on the driver."""
        if not self.exists(name):
            raise TableError(f"table {name} does not exist yet at {self.location(name)}")
        return self._log_metadata(name)[1]

    # ------------------------------------------------------------------ writing

    def conform(self, df: DataFrame, name: str) -> DataFrame:
        """Select the table's columns in order, casting to its types; error on missing columns."""
        s = spec(name)
        missing = [f.name for f in s.schema.fields if f.name not in df.columns]
        if missing:
            raise TableError(f"write to {name}: missing columns {missing} (have {df.columns})")
        return df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in s.schema.fields])

    def _check_schema(self, df: DataFrame, name: str) -> None:
        s = spec(name)
        want = {f.name: f.dataType for f in s.schema.fields}
        have = {f.name: f.dataType for f in df.schema.fields}
        problems = []
        for col, dtype in want.items():
            if col not in have:
                problems.append(f"missing column '{col}' ({dtype.simpleString()})")
            elif have[col] != dtype:
                problems.append(f"column '{col}' is {have[col].simpleString()}, expected {dtype.simpleString()}")
        problems += [f"unexpected column '{c}'" for c in have if c not in want]
        if problems:
            raise TableError(f"write to {name}: " + "; ".join(problems))

    def period_predicate(self, name: str, start: date, end: date, scope: Mapping[str, Any] | None = None) -> str:
        """The replaceWhere predicate for one period (both ends inclusive) and optional scope values."""
        s = spec(name)
        if s.period_column is None:
            raise TableError(f"table {name} has no period column; write it whole or give replace_where")
        col = _quote(s.period_column)
        parts = [f"{col} >= {_sql_literal(start)} AND {col} <= {_sql_literal(end)}"]
        scope = dict(scope or {})
        unknown = set(scope) - set(s.scope_columns)
        if unknown:
            raise TableError(f"table {name}: {sorted(unknown)} are not scope columns {list(s.scope_columns)}")
        parts += [f"{_quote(k)} = {_sql_literal(v)}" for k, v in sorted(scope.items())]
        return " AND ".join(parts)

    def where_predicate(self, name: str, where: Where) -> str:
        """Rows to select, every value escaped as a SQL literal: ``{col: value or [values]}`` is ``col = value``
        / ``col IN (values)`` joined by AND; a list of such mappings selects the rows of any of them (OR)."""
        if not isinstance(where, Mapping):
            scopes = [f"({self.where_predicate(name, w)})" for w in where]
            if not scopes:
                return "false"
            return " OR ".join(scopes)
        columns = set(spec(name).schema.fieldNames())
        parts = []
        for col, value in sorted(where.items()):
            if col not in columns:
                raise TableError(f"table {name}: no column '{col}' to select rows by")
            if isinstance(value, list | tuple | set | frozenset):
                if not value:
                    return "false"
                parts.append(f"{_quote(col)} IN ({', '.join(_sql_literal(v) for v in sorted(value))})")
            else:
                parts.append(f"{_quote(col)} = {_sql_literal(value)}")
        if not parts:
            raise TableError(f"table {name}: an empty row selection")
        return " AND ".join(parts)

    def delete(self, name: str, where: Where) -> int:
        """Delete the selected rows (not on append-only tables); returns how many were deleted."""
        s = spec(name)
        if s.append_only:
            raise TableError(f"table {name} is append-only: rows are never deleted")
        if not self.exists(name):
            return 0
        table = DeltaTable.forPath(self.spark, self.location(name))
        table.delete(self.where_predicate(name, where))
        _, info = self.last_commit(name)
        return int((info.get("operationMetrics") or {}).get("numDeletedRows", 0))

    def erase(self, name: str, keys: DataFrame, key: str, columns: Sequence[str],
              stamp: str | None = None) -> int:
        """Set ``columns`` to null in the rows whose ``key`` is among ``keys[key]`` (and ``stamp`` to now);
        returns how many rows were changed. The old values stay in older files until :meth:`vacuum`."""
        s = spec(name)
        if s.append_only:
            raise TableError(f"table {name} is append-only: nothing in it is erased")
        table = DeltaTable.forPath(self.spark, self.location(name))
        sets: dict[str, str | Column] = {c: F.lit(None).cast(s.schema[c].dataType) for c in columns}
        if stamp:
            sets[stamp] = F.current_timestamp()
        (table.alias("t").merge(keys.select(key).distinct().alias("k"), f"t.{_quote(key)} = k.{_quote(key)}")
         .whenMatchedUpdate(set=sets).execute())
        _, info = self.last_commit(name)
        return int((info.get("operationMetrics") or {}).get("numTargetRowsUpdated", 0))

    def vacuum(self, name: str, retention_hours: float) -> None:
        """Remove the files no version newer than ``retention_hours`` needs (shorter than Delta's 7-day safety
        default when asked: erasing personal data is the point)."""
        table = DeltaTable.forPath(self.spark, self.location(name))
        key = "spark.databricks.delta.retentionDurationCheck.enabled"
        check = self.spark.conf.get(key, "true") or "true"
        self.spark.conf.set(key, "false")
        try:
            table.vacuum(retentionHours=float(retention_hours))
        finally:
            self.spark.conf.set(key, check)

    def staging(self, job: str) -> StagingArea:
        """A scratch folder for one run of ``job`` under the lakehouse (``<root>/_staging/<job>-<id>``), removed
        when the run ends; folders of the same job left by runs that died are removed when the next starts."""
        return StagingArea(self, job)

    def distinct(self, name: str, column: str) -> set[Any]:
        """The distinct values of one column (for small domains: release ids, areas)."""
        if not self.exists(name):
            return set()
        return {r[0] for r in self.read(name).select(column).distinct().collect()}

    def set_properties(self, name: str, props: Mapping[str, str]) -> None:
        items = ", ".join(f"{_sql_literal(k)} = {_sql_literal(v)}" for k, v in sorted(props.items()))
        self.spark.sql(f"ALTER TABLE delta.`{self.location(name)}` SET TBLPROPERTIES ({items})")

    def sync_constraints(self, name: str) -> None:
        """Make the table's CHECK constraints those of its spec (a registered rule may have changed), before any
        write: what :meth:`ensure` does, which every write calls.

        A changed rule is swapped only when every row already there satisfies it; otherwise the old
        rule stays and the error names the table and the rule.
        """
        self.ensure(name)

    def write(
        self,
        df: DataFrame,
        name: str,
        *,
        period: tuple[date, date] | None = None,
        scope: Mapping[str, Any] | None = None,
        replace_where: str | None = None,
        where: Where | None = None,
        mode: Literal["overwrite", "append"] = "overwrite",
    ) -> WriteResult:
        """Write ``df`` to a registered table.

        - ``period=(start, end)`` (inclusive) replaces exactly that period (plus ``scope``
          values, e.g. ``{"spatial_unit": "admin2"}``): the idempotent re-run.
        - ``replace_where`` gives the predicate directly; ``where={column: value or [values]}``
          builds it with every value escaped (replace the rows of one release, one area, ...).
        - neither: ``mode="overwrite"`` replaces the whole table; ``mode="append"`` appends
          (the only mode allowed on append-only tables).

        Delta checks every row against the predicate and the CHECK constraints; a
        violating write fails and leaves the table unchanged.
        """
        s = spec(name)
        self._check_schema(df, name)
        if where is not None:
            if replace_where is not None or period is not None:
                raise TableError(f"write to {name}: give one of period, replace_where or where")
            replace_where = self.where_predicate(name, where)
        if period is not None:
            if replace_where is not None:
                raise TableError(f"write to {name}: give period or replace_where, not both")
            replace_where = self.period_predicate(name, period[0], period[1], scope)
        if s.append_only and (mode != "append" or replace_where):
            raise TableError(f"table {name} is append-only: use mode='append'")
        if replace_where is not None and mode != "overwrite":
            raise TableError(f"write to {name}: replace_where needs mode='overwrite'")

        created = not self.exists(name)
        self.ensure(name)
        writer = df.write.format("delta").mode(mode)
        if replace_where is not None:
            writer = writer.option("replaceWhere", replace_where)
        try:
            writer.save(self.location(name))
        except Exception:
            if created:
                self._drop_location(name)
            raise
        version = self.version(name)
        info = self.commit_info(name, version)
        metrics = info.get("operationMetrics") or {}
        return WriteResult(
            table=name,
            version=version,
            rows_written=int(metrics.get("numOutputRows", 0)),
            operation=str(info.get("operation")),
        )

    def merge(self, df: DataFrame, name: str, keys: Sequence[str] | None = None) -> WriteResult:
        """Upsert by key: matching rows are updated, new rows inserted (idempotent)."""
        s = spec(name)
        keys = list(keys or s.keys)
        if not keys:
            raise TableError(f"merge into {name}: no keys given and the table declares none")
        self._check_schema(df, name)
        created = not self.exists(name)
        table = self.ensure(name)
        cond = " AND ".join(f"t.{_quote(k)} <=> s.{_quote(k)}" for k in keys)
        try:
            (
                table.alias("t")
                .merge(df.alias("s"), cond)
                .whenMatchedUpdateAll()
                .whenNotMatchedInsertAll()
                .execute()
            )
        except Exception:
            if created:
                self._drop_location(name)
            raise
        version = self.version(name)
        info = self.commit_info(name, version)
        metrics = info.get("operationMetrics") or {}
        written = int(metrics.get("numTargetRowsInserted", 0)) + int(metrics.get("numTargetRowsUpdated", 0))
        return WriteResult(name, version, written, str(info.get("operation")))

    def _drop_location(self, name: str) -> None:
        self.delete_path(self.location(name))

    def delete_path(self, location: str) -> None:
        """Remove a folder (e.g. a job's staging files) recursively; no error when it is absent."""
        fs, path = self._hadoop_path(location)
        fs.delete(path, True)

    # ------------------------------------------------------------------ reading

    def read(
        self,
        name: str,
        *,
        version: int | None = None,
        timestamp: str | datetime | None = None,
    ) -> DataFrame:
        """The table now, or as it was at a version or a timestamp (Delta time travel)."""
        if not self.exists(name):
            raise TableError(f"table {name} does not exist yet at {self.location(name)}; run its job first")
        reader = self.spark.read.format("delta")
        if version is not None and timestamp is not None:
            raise TableError(f"read {name}: give version or timestamp, not both")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        if timestamp is not None:
            ts = timestamp.isoformat(sep=" ") if isinstance(timestamp, datetime) else timestamp
            reader = reader.option("timestampAsOf", ts)
        return reader.load(self.location(name))

    def history(self, name: str, limit: int | None = None) -> DataFrame:
        """Delta history, newest first: version, timestamp, operation, parameters, metrics."""
        if not self.exists(name):
            raise TableError(f"table {name} does not exist yet at {self.location(name)}")
        table = DeltaTable.forPath(self.spark, self.location(name))
        return table.history(limit) if limit else table.history()

    def version(self, name: str) -> int:
        """The table's latest version, from its Delta log (a listing of the log, no Spark job)."""
        if not self.exists(name):
            raise TableError(f"table {name} does not exist yet at {self.location(name)}")
        return int(self._snapshot(name).version())

    def last_commit(self, name: str) -> tuple[int, dict[str, Any]]:
        """The latest version and its commitInfo."""
        version = self.version(name)
        return version, self.commit_info(name, version)

    def commit_info(self, name: str, version: int) -> dict[str, Any]:
        """The commitInfo action of one commit (operation, parameters, metrics); {} when the commit's log file no
        longer exists (log clean-up)."""
        for action in self.log_actions(name, version) or []:
            if "commitInfo" in action:
                info: dict[str, Any] = action["commitInfo"]
                return info
        return {}

    def log_actions(self, name: str, version: int) -> list[dict[str, Any]] | None:
        """The actions (add, remove, metaData, commitInfo, ...) of one commit, read from its file in the Delta
        log on the driver (no Spark job: a commit file is small); None when the file no longer exists."""
        fs, path = self._hadoop_path(f"{self.location(name)}/_delta_log/{version:020d}.json")
        if not fs.exists(path):
            return None
        jvm = self.spark.sparkContext._jvm  # noqa: SLF001
        stream = fs.open(path)
        try:
            text = jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")  # type: ignore[union-attr]
        finally:
            stream.close()
        return [json.loads(line) for line in str(text).splitlines() if line.strip()]

    def changed_partitions(self, name: str, column: str, after_version: int,
                           up_to_version: int | None = None) -> set[str] | None:
        """The values of partition ``column`` whose files commits after ``after_version`` (up to ``up_to_version``,
        default the latest) added or removed, read from the table's Delta log; None when a commit's log entry is
        no longer there (log clean-up): the caller then cannot tell and must recompute everything."""
        if column not in spec(name).partition_by:
            raise TableError(f"table {name}: '{column}' is not a partition column")
        last = self.version(name) if up_to_version is None else up_to_version
        if last <= after_version:
            return set()
        values: set[str] = set()
        for version in range(after_version + 1, last + 1):
            actions = self.log_actions(name, version)
            if actions is None:
                return None
            for action in actions:
                for kind in ("add", "remove"):
                    part = (action.get(kind) or {}).get("partitionValues") or {}
                    if column in part and part[column] is not None:
                        values.add(part[column])
        return values


# =========================================================================== catalogue
# One StructType per table: the contract transforms end with (``select`` of it).


def _fields(*cols: tuple[str, T.DataType, bool]) -> T.StructType:
    return T.StructType([T.StructField(n, t, nullable) for n, t, nullable in cols])


S, L, D, TS, DBL, B, INT = (
    T.StringType(),
    T.LongType(),
    T.DateType(),
    T.TimestampType(),
    T.DoubleType(),
    T.BooleanType(),
    T.IntegerType(),
)
PSEUDONYM_CHECK = "subscriber_id RLIKE '^[0-9a-f]{64}$'"


def _reg(**kwargs: Any) -> TableSpec:
    return register(TableSpec(**kwargs))


# --- CDR -------------------------------------------------------------------------------

CDR_EVENTS = _reg(
    name="bronze.cdr_events",
    schema=_fields(
        ("event_time", TS, False),
        ("event_date", D, False),
        ("subscriber_id", S, False),
        ("counterpart_id", S, True),
        ("cell_id", S, False),
        ("event_type", S, False),
        ("outgoing", B, True),
        ("duration_s", DBL, True),
        ("source_file", S, False),
    ),
    description="Validated CDR events; subscriber ids are keyed HMAC-SHA256 pseudonyms.",
    source="cdr",
    owner_job="cdr.ingest",
    partition_by=("event_date",),
    period_column="event_date",
    constraints={
        "subscriber_is_pseudonym": PSEUDONYM_CHECK,
        "counterpart_is_pseudonym": "counterpart_id IS NULL OR counterpart_id RLIKE '^[0-9a-f]{64}$'",
        "event_date_matches_time": "event_date = CAST(event_time AS DATE)",
    },
)

CDR_QUARANTINE = _reg(
    name="quarantine.cdr_events",
    schema=_fields(
        ("period_start", D, False),
        ("source_file", S, False),
        ("reason", S, False),
        ("detail", S, True),
        ("event_time", TS, True),
        ("subscriber_id", S, True),
        ("cell_id", S, True),
    ),
    description="CDR rows that could not be used, with the reason; no raw field (a file whose header lies "
                "could put a phone number in any column): the parsed time, the subscriber's pseudonym, and the "
                "cell id only when the cells table knows it.",
    source="cdr",
    owner_job="cdr.ingest",
    partition_by=("period_start",),
    period_column="period_start",
    constraints={
        "subscriber_is_pseudonym": "subscriber_id IS NULL OR subscriber_id RLIKE '^[0-9a-f]{64}$'",
    },
    properties={"delta.dataSkippingStatsColumns": "reason,event_time"},
)

CDR_CELLS = _reg(
    name="silver.cdr_cells",
    schema=_fields(
        ("cell_id", S, False),
        ("site_id", S, True),
        ("longitude", DBL, False),
        ("latitude", DBL, False),
        ("valid_from", D, True),
        ("valid_to", D, True),
        ("h3_index", S, False),
        ("admin1", S, True),
        ("admin2", S, True),
        ("assignment", S, False),
    ),
    description="Cells with their H3 index and containing admin areas, valid over a date range.",
    source="cdr",
    owner_job="cdr.ingest",
    keys=("cell_id", "valid_from"),
    constraints={"assignment_known": "assignment IN ('within', 'nearest')"},
)

CDR_DAILY_LOCATIONS = _reg(
    name="silver.cdr_daily_locations",
    schema=_fields(
        ("date", D, False),
        ("subscriber_id", S, False),
        ("spatial_unit", S, False),
        ("unit", S, False),
        ("n_events", L, False),
    ),
    description="One location per subscriber per day (rule from conf: last event or most frequent unit).",
    source="cdr",
    owner_job="cdr.mobility",
    partition_by=("date",),
    period_column="date",
    scope_columns=("spatial_unit",),
    keys=("date", "subscriber_id", "spatial_unit"),
    constraints={"subscriber_is_pseudonym": PSEUDONYM_CHECK, "events_positive": "n_events > 0"},
)

CDR_SUBSCRIBER_DAYS = _reg(
    name="silver.cdr_subscriber_days",
    schema=_fields(
        ("date", D, False),
        ("subscriber_id", S, False),
        ("spatial_unit", S, False),
        ("unit", S, False),
        ("n_all", L, False),
        ("n_day", L, False),
        ("last_day", TS, True),
        ("n_night", L, False),
        ("last_night", TS, True),
    ),
    description="Per subscriber, day and unit: events (all, in the daily-location hours, at night) and the time "
    "of the last one. Every mobility metric derives from these rows, and a day's rows depend on that day's "
    "events only, so a new or re-delivered day replaces its own partition.",
    source="cdr",
    owner_job="cdr.mobility",
    partition_by=("date",),
    period_column="date",
    scope_columns=("spatial_unit",),
    keys=("date", "subscriber_id", "spatial_unit", "unit"),
    constraints={"subscriber_is_pseudonym": PSEUDONYM_CHECK, "events_positive": "n_all > 0",
                 "hours_within_all": "n_day <= n_all AND n_night <= n_all"},
)

CDR_SUBSCRIBER_ACTIVITY = _reg(
    name="silver.cdr_subscriber_activity",
    schema=_fields(
        ("spatial_unit", S, False),
        ("period_start", D, False),
        ("period_end", D, False),
        ("subscriber_id", S, False),
        ("n_events", L, False),
        ("max_events_day", L, False),
        ("excluded", S, True),
    ),
    description="The activity filters' verdict per subscriber over the mobility period: events, most events on "
    "one day, and the reason a SIM is left out (null: kept).",
    source="cdr",
    owner_job="cdr.mobility",
    scope_columns=("spatial_unit",),
    keys=("spatial_unit", "subscriber_id"),
    constraints={"subscriber_is_pseudonym": PSEUDONYM_CHECK},
)

CDR_MOBILITY_RUNS = _reg(
    name="silver.cdr_mobility_runs",
    schema=_fields(
        ("spatial_unit", S, False),
        ("period_start", D, False),
        ("period_end", D, False),
        ("settings_sha256", S, False),
        ("bronze_version", L, False),
        ("cells_version", L, False),
        ("mode", S, False),
        ("dates_recomputed", S, False),
        ("subscribers_flipped", L, False),
        ("table_versions", S, False),
        ("finished_at", TS, False),
    ),
    description="One row per cdr.mobility run: its period, a hash of the settings its rows depend on, the "
    "bronze.cdr_events version it read, and (incremental runs) the dates it recomputed and how many subscribers "
    "the activity filters changed their verdict on, and the versions it left the mobility tables at (JSON). An "
    "incremental run starts from the last row, and only when no mobility table changed after it.",
    source="cdr",
    owner_job="cdr.mobility",
    append_only=True,
    constraints={"mode_known": "mode IN ('full', 'incremental')"},
)

CDR_PRESENCE = _reg(
    name="gold.cdr_presence_daily",
    schema=_fields(
        ("date", D, False),
        ("spatial_unit", S, False),
        ("unit", S, False),
        ("n_subscribers", L, False),
        ("est_population", DBL, True),
    ),
    description="Distinct subscribers with their daily location in each unit, per day (exact counts). "
    "est_population is an ESTIMATE (n_subscribers x the unit's scaling weight), null without scaling.",
    source="cdr",
    owner_job="cdr.mobility",
    partition_by=("date",),
    period_column="date",
    scope_columns=("spatial_unit",),
    keys=("date", "spatial_unit", "unit"),
    constraints={"count_positive": "n_subscribers > 0"},
)

CDR_CELLS_QUARANTINE = _reg(
    name="quarantine.cdr_cells",
    schema=_fields(
        ("cell_id", S, True),
        ("source_file", S, False),
        ("reason", S, False),
        ("longitude", DBL, True),
        ("latitude", DBL, True),
    ),
    description="Cells that could not be placed in an admin area or failed validation, with the reason.",
    source="cdr",
    owner_job="cdr.ingest",
)

CDR_HOME_LOCATIONS = _reg(
    name="silver.cdr_home_locations",
    schema=_fields(
        ("window", S, False),
        ("window_start", D, False),
        ("window_end", D, False),
        ("subscriber_id", S, False),
        ("spatial_unit", S, False),
        ("home_unit", S, False),
        ("n_days_home", L, False),
        ("n_days_seen", L, False),
    ),
    description="Home location per subscriber and window: modal night-time daily location over the window.",
    source="cdr",
    owner_job="cdr.mobility",
    period_column="window_start",
    scope_columns=("spatial_unit", "window"),
    keys=("window", "subscriber_id", "spatial_unit"),
    constraints={"subscriber_is_pseudonym": PSEUDONYM_CHECK, "days_consistent": "n_days_home <= n_days_seen"},
)


# --- CDR gold: flows and displacement --------------------------------------------------------
EST = ("est_population", DBL, True)
EST_NOTE = " est_population is an ESTIMATE (count x the origin's scaling weight), null without scaling."

CDR_OD_DAILY = _reg(
    name="gold.cdr_od_daily",
    schema=_fields(
        ("date", D, False),
        ("spatial_unit", S, False),
        ("origin", S, False),
        ("destination", S, False),
        ("n_subscribers", L, False),
        EST,
    ),
    description="Consecutive-day flows: subscribers whose daily location was origin on date and destination "
    "on the next day (origin = destination: stayed)." + EST_NOTE,
    source="cdr",
    owner_job="cdr.mobility",
    partition_by=("date",),
    period_column="date",
    scope_columns=("spatial_unit",),
    keys=("date", "spatial_unit", "origin", "destination"),
    constraints={"count_positive": "n_subscribers > 0"},
)

CDR_OD_WEEKLY = _reg(
    name="gold.cdr_od_weekly",
    schema=_fields(
        ("week_start", D, False),
        ("spatial_unit", S, False),
        ("origin", S, False),
        ("destination", S, False),
        ("n_subscribers", L, False),
        ("n_transitions", L, False),
        ("days_covered", INT, False),
        EST,
    ),
    description="Consecutive-day flows per ISO week (Monday start): distinct subscribers with at least one "
    "origin -> destination day-to-day transition starting in the week, the number of such transitions, and "
    "how many of the week's days the run's period covered." + EST_NOTE,
    source="cdr",
    owner_job="cdr.mobility",
    period_column="week_start",
    scope_columns=("spatial_unit",),
    keys=("week_start", "spatial_unit", "origin", "destination"),
    constraints={"count_positive": "n_subscribers > 0", "transitions_cover_subscribers": "n_transitions >= n_subscribers",
                 "days_in_week": "days_covered BETWEEN 1 AND 7"},
)

CDR_OD_HOME_CURRENT = _reg(
    name="gold.cdr_od_home_current",
    schema=_fields(
        ("date", D, False),
        ("spatial_unit", S, False),
        ("origin", S, False),
        ("destination", S, False),
        ("n_subscribers", L, False),
        EST,
    ),
    description="Home-to-current flows: subscribers with baseline home origin whose daily location on date "
    "was destination." + EST_NOTE,
    source="cdr",
    owner_job="cdr.mobility",
    partition_by=("date",),
    period_column="date",
    scope_columns=("spatial_unit",),
    keys=("date", "spatial_unit", "origin", "destination"),
    constraints={"count_positive": "n_subscribers > 0"},
)

CDR_DISPLACEMENT = _reg(
    name="gold.cdr_displacement",
    schema=_fields(
        ("event_date", D, False),
        ("week_since_event", INT, False),
        ("window_start", D, False),
        ("window_end", D, False),
        ("spatial_unit", S, False),
        ("origin", S, False),
        ("destination", S, False),
        ("n_subscribers", L, False),
        EST,
    ),
    description="Displacement after event_date: subscribers whose home in the post-event week differs from "
    "their pre-event baseline home, per origin (baseline home) x destination (post-event home)." + EST_NOTE,
    source="cdr",
    owner_job="cdr.mobility",
    period_column="window_start",
    scope_columns=("spatial_unit", "event_date"),
    keys=("event_date", "week_since_event", "spatial_unit", "origin", "destination"),
    constraints={"count_positive": "n_subscribers > 0", "displaced": "origin <> destination",
                 "after_event": "window_start >= event_date"},
)

CDR_DISPLACEMENT_SHARE = _reg(
    name="gold.cdr_displacement_share",
    schema=_fields(
        ("event_date", D, False),
        ("week_since_event", INT, False),
        ("window_start", D, False),
        ("window_end", D, False),
        ("spatial_unit", S, False),
        ("origin", S, False),
        ("n_baseline_residents", L, False),
        ("n_subscribers", L, False),
        ("n_away", L, False),
        ("share_away", DBL, False),
        EST,
    ),
    description="Share of each origin's baseline residents who are away: n_subscribers = baseline residents "
    "with a home in the post-event week, n_away = those whose home there is elsewhere, share_away = "
    "n_away / n_subscribers. est_population is an ESTIMATE of people away (n_away x the origin's weight).",
    source="cdr",
    owner_job="cdr.mobility",
    period_column="window_start",
    scope_columns=("spatial_unit", "event_date"),
    keys=("event_date", "week_since_event", "spatial_unit", "origin"),
    constraints={"observed_within_residents": "n_subscribers <= n_baseline_residents",
                 "away_within_observed": "n_away <= n_subscribers",
                 "share_range": "share_away BETWEEN 0 AND 1"},
)


# --- Remote sensing: settlement change ------------------------------------------------------

_PAIR = (("area", S, False), ("date_before", D, False), ("date_after", D, False),
         ("sensor_before", S, False), ("sensor_after", S, False))
_CHANGE = (
    ("n_pixels", L, False),
    ("n_pixels_valid", L, False),
    ("n_built_before", L, False),
    ("n_built_after", L, False),
    ("n_new", L, False),
    ("n_lost", L, False),
    ("n_stable", L, False),
    ("valid_km2", DBL, False),
    ("built_km2_before", DBL, False),
    ("built_km2_after", DBL, False),
    ("new_km2", DBL, False),
    ("lost_km2", DBL, False),
    ("change_km2", DBL, False),
    ("change_pct", DBL, True),
    ("valid_fraction", DBL, False),
)
_CHANGE_NOTE = (" Built-up is counted over pixels valid at both dates (no nodata, no masked cloud); "
                "change_km2 = built_km2_after - built_km2_before, change_pct relative to before (null when 0).")
_CHANGE_CHECKS = {
    "valid_within_total": "n_pixels_valid <= n_pixels AND n_pixels > 0",
    "classes_add_up": "n_built_before = n_stable + n_lost AND n_built_after = n_stable + n_new",
    "built_within_valid": "n_stable + n_lost + n_new <= n_pixels_valid",
    "fraction_range": "valid_fraction BETWEEN 0 AND 1",
    "dates_ordered": "date_after > date_before",
}

SETTLEMENT_SCENES = _reg(
    name="silver.settlement_scenes",
    schema=_fields(
        ("scene_id", S, False), ("area", S, False), ("date", D, False), ("sensor", S, False), ("path", S, False),
        ("crs", S, False), ("width", INT, False), ("height", INT, False), ("pixel_size_x", DBL, False),
        ("pixel_size_y", DBL, False), ("band_files", S, False), ("level", S, True), ("out_of_range", DBL, True),
        ("radiometry", S, True), ("notes", S, True),
    ),
    description="Scene catalogue: every usable scene with its grid, where each band role is read from (and how "
    "it was found), its radiometric level, the largest share of a band's valid pixels outside that level's "
    "physical range and the per-band figures, and notes (calibration used, warnings kept with on_radiometry: warn).",
    source="remote_sensing", owner_job="remote_sensing.change", keys=("scene_id",),
)

SETTLEMENT_QUARANTINE = _reg(
    name="quarantine.settlement_scenes",
    schema=_fields(
        ("path", S, False), ("area", S, True), ("date", D, True), ("sensor", S, True),
        ("stage", S, False), ("reason", S, False),
    ),
    description="Scenes that could not be opened or read (corrupt, truncated, missing band, wrong band count) or "
    "whose values do not fit their profile's radiometric level, with the path, the stage that found it and the "
    "reason; the other scenes proceed.",
    source="remote_sensing", owner_job="remote_sensing.change",
    constraints={"stage_known": "stage IN ('catalogue', 'radiometry', 'tiling')"},
)

SETTLEMENT_TILES = _reg(
    name="silver.settlement_tiles",
    schema=_fields(
        *_PAIR[:3], ("window_id", S, False), ("row_off", INT, False), ("col_off", INT, False),
        ("height", INT, False), ("width", INT, False), ("n_pixels", L, False), ("n_pixels_valid", L, False),
        ("n_outside_admin", L, True), ("valid_fraction", DBL, False), ("worker_peak_rss_mb", DBL, True),
        ("classifier", S, True),
    ),
    description="One row per processed window of a scene pair: valid-pixel fraction (quality) and pixels "
    "outside every admin area.",
    source="remote_sensing", owner_job="remote_sensing.change",
    period_column="date_after", scope_columns=("area", "date_before"),
    constraints={"valid_within_total": "n_pixels_valid <= n_pixels"},
)

SETTLEMENT_CHANGE_H3 = _reg(
    name="gold.settlement_change_h3",
    schema=_fields(*_PAIR, ("h3_resolution", INT, False), ("h3_index", S, False), *_CHANGE),
    description="Settlement change per H3 cell (pixel centres) between two dates." + _CHANGE_NOTE,
    source="remote_sensing", owner_job="remote_sensing.change",
    period_column="date_after", scope_columns=("area", "date_before", "h3_resolution"),
    keys=("area", "date_before", "date_after", "h3_resolution", "h3_index"),
    constraints=_CHANGE_CHECKS,
)

SETTLEMENT_CHANGE_ADMIN = _reg(
    name="gold.settlement_change_admin",
    schema=_fields(*_PAIR, ("level", S, False), ("unit", S, False), *_CHANGE),
    description="Settlement change per admin area (pixel centres inside the polygon) between two dates."
    + _CHANGE_NOTE,
    source="remote_sensing", owner_job="remote_sensing.change",
    period_column="date_after", scope_columns=("area", "date_before", "level"),
    keys=("area", "date_before", "date_after", "level", "unit"),
    constraints=_CHANGE_CHECKS,
)

SETTLEMENT_ACCURACY = _reg(
    name="gold.settlement_accuracy",
    schema=_fields(
        ("area", S, False), ("date_before", D, False), ("date_after", D, False), ("classifier", S, False),
        ("layer", S, False), ("date", D, False), ("reference", S, False), ("reference_sha256", S, False),
        ("n_reference", L, False), ("n_reference_built", L, False), ("n_mapped", L, False),
        ("total_km2", DBL, False), ("mapped_km2", DBL, False), ("adjusted_km2", DBL, True),
        ("adjusted_km2_ci95", DBL, True), ("overall_accuracy", DBL, True), ("overall_ci95", DBL, True),
        ("users_accuracy", DBL, True), ("users_ci95", DBL, True), ("producers_accuracy", DBL, True),
        ("producers_ci95", DBL, True), ("f1", DBL, True), ("confusion", S, False), ("assessed_at", TS, False),
    ),
    description="Accuracy of a settlement layer (built-up at a date, or new built-up over a pair) of one built-up "
    "rule against one reference: the error matrix (map rows, reference columns), overall / user's / producer's "
    "accuracy and F1 of the built-up class, and the area-adjusted built-up km2, each with its 95% interval "
    "(Olofsson et al. 2014, map classes as strata). mapped_km2 is the map's own area of the class.",
    source="remote_sensing", owner_job="remote_sensing.accuracy",
    period_column="date_after", scope_columns=("area", "date_before"),
    keys=("area", "date_before", "date_after", "classifier", "layer", "date", "reference"),
    constraints={"layer_known": "layer IN ('builtup', 'new_builtup')",
                 "reference_within": "n_reference_built <= n_reference",
                 "accuracy_range": "overall_accuracy IS NULL OR overall_accuracy BETWEEN 0 AND 1"},
)

# --- Social media ------------------------------------------------------------------------

SOCIAL_POSTS = _reg(
    name="bronze.social_posts",
    schema=_fields(
        ("post_key", S, False),
        ("author_key", S, False),
        ("created_at", TS, False),
        ("date", D, False),
        ("text", S, True),
        ("lang_field", S, True),
        ("longitude", DBL, True),
        ("latitude", DBL, True),
        ("place_kind", S, True),
        ("is_retweet", B, False),
        ("is_duplicate", B, False),
        ("source_file", S, False),
        ("line_number", L, False),
        ("ingested_at", TS, False),
        ("text_erased_at", TS, True),
    ),
    description="Accepted posts. post_key and author_key are keyed HMAC-SHA256 pseudonyms of the post and author "
    "ids. text lives only here and is erased after social.text_retention_days (text_erased_at). is_retweet / "
    "is_duplicate flag retweets and exact duplicates (same post, or same author and text).",
    source="social",
    owner_job="social.ingest",
    partition_by=("date",),
    period_column="date",
    keys=("post_key",),
    constraints={"author_is_pseudonym": "author_key RLIKE '^[0-9a-f]{64}$'",
                 "post_is_pseudonym": "post_key RLIKE '^[0-9a-f]{64}$'"},
    # No min/max statistics of the text in the Delta log: the log outlives the erased files.
    properties={"delta.dataSkippingStatsColumns": "post_key,author_key,created_at,"
                "ingested_at"},
)

SOCIAL_QUARANTINE = _reg(
    name="quarantine.social_posts",
    schema=_fields(
        ("source_file", S, False),
        ("line_number", L, False),
        ("reason", S, False),
        ("detail", S, True),
        ("ingested_at", TS, False),
    ),
    description="Post lines that could not be used (file, line number, reason; never the line itself: it may hold "
    "raw ids and text).",
    source="social",
    owner_job="social.ingest",
)

SOCIAL_SILVER = _reg(
    name="silver.social_posts",
    schema=_fields(
        ("post_key", S, False),
        ("author_key", S, False),
        ("created_at", TS, False),
        ("date", D, False),
        ("week_start", D, False),
        ("language", S, False),
        ("language_source", S, False),
        ("on_topic", B, False),
        ("topic_terms", T.ArrayType(S, False), False),
        ("topic_lists", T.ArrayType(S, False), False),
        ("h3_index", S, True),
        ("spatial_unit", S, False),
        ("region", S, True),
        ("place_status", S, False),
        ("counted", B, False),
        ("sentiment", S, True),
        ("sentiment_prob", DBL, True),
        ("p_negative", DBL, True),
        ("p_neutral", DBL, True),
        ("p_positive", DBL, True),
        ("score", DBL, True),
        ("model_name", S, True),
        ("model_hash", S, True),
        ("model_precision", S, True),
    ),
    description="Posts without text: language (field or detected), migration topic (matched terms), place "
    "(H3, region; null when the post has none), sentiment of on-topic posts (label, probability, "
    "p_positive - p_negative score) with the model name, a SHA-256 of its weights and the numeric precision it "
    "ran at (fp32, bf16, int8). counted is false for "
    "retweets and duplicates when they are excluded.",
    source="social",
    owner_job="social.sentiment",
    partition_by=("date",),
    period_column="date",
    keys=("post_key",),
    constraints={"author_is_pseudonym": "author_key RLIKE '^[0-9a-f]{64}$'",
                 "scored_when_on_topic": "NOT on_topic OR sentiment IS NOT NULL"},
)

SOCIAL_GOLD = _reg(
    name="gold.social_sentiment",
    schema=_fields(
        ("period", S, False),
        ("period_start", D, False),
        ("spatial_unit", S, False),
        ("region", S, False),
        ("language", S, False),
        ("n_posts", L, False),
        ("n_users", L, False),
        ("share_negative", DBL, False),
        ("share_neutral", DBL, False),
        ("share_positive", DBL, False),
        ("mean_score", DBL, False),
        ("n_posts_all", L, False),
        ("posts_per_10k", DBL, False),
    ),
    description="Migration sentiment series per period (day, ISO week) x region x language ('all' = every "
    "language), and national (region 'national', every post incl. those without a place): on-topic posts, "
    "distinct authors (n_users), shares of negative / neutral / positive, mean p_positive - p_negative, all "
    "counted posts of the group (n_posts_all) and on-topic posts per 10,000 of them (volume-normalised).",
    source="social",
    owner_job="social.sentiment",
    period_column="period_start",
    keys=("period", "period_start", "spatial_unit", "region", "language"),
    constraints={"users_positive": "n_users > 0", "users_at_most_posts": "n_users <= n_posts"},
)
