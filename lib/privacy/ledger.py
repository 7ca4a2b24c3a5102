"""The privacy-budget ledger: epsilon (and delta) spent by noised releases, per dataset, append-only.

A noised release costs the composition over its slices (lib/privacy/noise.py:
one person can be in every slice). It is checked against the policy's budget
before anything is published and charged before its audit row is written, so a
release that dies between the two has spent its budget (the safe side: its
noised values existed). Epsilons add up across releases (basic composition), and
so do deltas.
"""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.privacy.noise import Cost
from lib.privacy.policy import Policy
from lib.tables import Lakehouse, TableSpec, register

BUDGET = register(TableSpec(
    name="audit.privacy_budget",
    schema=T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("release_id", T.StringType(), False),
        T.StructField("created_at", T.TimestampType(), False),
        T.StructField("epsilon", T.DoubleType(), False),
        T.StructField("delta", T.DoubleType(), False),
    ]),
    description="Privacy-budget ledger: epsilon (and delta) spent by each noised release, per dataset.",
    source="privacy",
    owner_job="release",
    append_only=True,
    constraints={"epsilon_positive": "epsilon > 0"},
))


class BudgetExceeded(RuntimeError):
    pass


def spent(lake: Lakehouse, dataset: str) -> Cost:
    if not lake.exists(BUDGET.name):
        return Cost(0.0, 0.0)
    row = lake.read(BUDGET.name).filter(F.col("dataset") == dataset).agg(
        F.sum("epsilon").alias("e"), F.sum("delta").alias("d")).first()
    return Cost(float(row["e"] or 0.0), float(row["d"] or 0.0)) if row else Cost(0.0, 0.0)


def check(lake: Lakehouse, policy: Policy, dataset: str, cost: Cost, what: str) -> None:
    used = spent(lake, dataset)
    if used.epsilon + cost.epsilon > policy.budget.epsilon + 1e-12:
        raise BudgetExceeded(f"{what}: privacy budget of {dataset} exceeded: spent epsilon {used.epsilon:g} + "
                             f"{cost.epsilon:g} > budget {policy.budget.epsilon:g}. Refused.")
    if cost.delta and used.delta + cost.delta > policy.budget.delta + 1e-18:
        raise BudgetExceeded(f"{what}: privacy budget of {dataset} exceeded: spent delta {used.delta:g} + "
                             f"{cost.delta:g} > budget {policy.budget.delta:g}. Refused.")


def charge(lake: Lakehouse, dataset: str, release_id: str, created: datetime, cost: Cost) -> None:
    row = (dataset, release_id, created.replace(tzinfo=None), float(cost.epsilon), float(cost.delta))
    lake.write(lake.spark.createDataFrame([row], schema=BUDGET.schema), BUDGET.name, mode="append")
