"""What a pipeline adds to the releases of the tables it owns, registered by the pipeline itself.

A release type names its owner (``owner: cdr`` in conf/privacy.yaml). The owner's
package registers one :class:`ReleaseHooks` under that name when its
``release_hooks`` module is imported (``jobs/release.py`` imports each one by
name); the release code in this package only looks them up. A pipeline with
nothing to add registers nothing and gets the defaults: no extra inputs, no
preparation, no parent columns, no polygons, the generic quick-look plot.

Reads and writes no tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from lib.config import Config
    from lib.privacy.policy import ReleaseType
    from lib.tables import Lakehouse

# (config, release type, one slice's rows) -> (prepared rows, counts for the audit record); runs on executors
Prepare = Callable[["Config", "ReleaseType", pd.DataFrame], tuple[pd.DataFrame, dict[str, int]]]
# (lakehouse, release type, source rows) -> the rows with the hierarchy's parent columns added
Parents = Callable[["Lakehouse", "ReleaseType", "DataFrame"], "DataFrame"]
# (config, release type, guarded cells) -> (polygons keyed by the cell column, key column, description) or None
Polygons = Callable[["Config", "ReleaseType", pd.DataFrame], "tuple[Any, str, str] | None"]
# (release type name, release type, guarded cells, png path) -> caption
Draw = Callable[[str, "ReleaseType", pd.DataFrame, Path], str]


# (config, release type, source rows) -> the rows this release publishes (e.g. one spatial level)
Rows = Callable[["Config", "ReleaseType", "DataFrame"], "DataFrame"]


# (lakehouse, config, release type, guarded cells) -> more manifest entries (e.g. the layers' accuracy)
Notes = Callable[["Lakehouse", "Config", "ReleaseType", "DataFrame"], dict[str, Any]]


# (config, release type, release folder with cells.parquet written) -> manifest entries for the files it added
# to the folder (e.g. rasters masked to the released cells); every file in the folder is checksummed and signed
Files = Callable[["Config", "ReleaseType", Path], dict[str, Any]]


# (config, release type) -> the slice partners look at first besides the most withheld one (e.g. the event
# day), as {slice column: value as text}, or None
Event = Callable[["Config", "ReleaseType"], "dict[str, str] | None"]


@dataclass(frozen=True)
class ReleaseHooks:
    inputs: tuple[str, ...] = ()  # extra source columns ``prepare`` needs (dropped before the guard)
    prepare: Prepare | None = None
    parents: Parents | None = None
    polygons: Polygons | None = None
    draw: Draw | None = None
    rows: Rows | None = None
    notes: Notes | None = None
    files: Files | None = None
    event: Event | None = None
    # A slice column whose values are levels of one hierarchy (counts at one level are sums of the next): the
    # same slice is never published at two levels (lib/privacy/release.py refuses, naming the earlier release).
    level_column: str | None = None


_HOOKS: dict[str, ReleaseHooks] = {}


def register(owner: str, hooks: ReleaseHooks) -> ReleaseHooks:
    """Register ``owner``'s hooks (the same hooks twice is fine; different ones are an error)."""
    existing = _HOOKS.get(owner)
    if existing is not None and existing != hooks:
        raise ValueError(f"release hooks for '{owner}' are registered twice with different hooks")
    _HOOKS[owner] = hooks
    return hooks


def hooks_for(owner: str) -> ReleaseHooks:
    return _HOOKS.get(owner, ReleaseHooks())
