"""List the registered tables: logical name, location, current Delta version, rows, description.

Reads every registered table that exists; writes nothing.
"""

from __future__ import annotations

from pyspark.sql import SparkSession

from lib.config import Config
from lib.tables import Lakehouse, registered

DESCRIPTION = "List the registered tables: location, current version, rows and description"


def run(spark: SparkSession, cfg: Config) -> None:
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    print(f"{'table':<30} {'version':>7} {'rows':>12}  location / description")
    for spec in registered():
        if lake.exists(spec.name):
            version = str(lake.version(spec.name))
            rows = f"{lake.read(spec.name).count():,}"
        else:
            version, rows = "-", "(not yet)"
        print(f"{spec.name:<30} {version:>7} {rows:>12}  {lake.location(spec.name)}")
        print(f"{'':<52}{spec.description}")
