"""Release: the only way data leaves the platform. Guard a gold table, export it, record it.

    ./spark-submit.sh release <type> [--period START:END] [--requester NAME] [--purpose TEXT]
                                     [--override-reason TEXT]

Reads the release type's source table (conf/privacy.yaml), for the period when
given, guards every slice on the executors and publishes the result all at once
(lib/privacy/release.py): ``exports.<type>`` and ``exports.<type>_margins``,
partner files under ``<exports_dir>/<release-id>/`` (cells and margins as CSV and
Parquet, the signed ``manifest.json``, the owning pipeline's quick-look plot and
spatial files) and one signed row in the append-only ``audit.releases``. The same
inputs under the same policy are recognised and not released twice.
"""

from __future__ import annotations

import argparse
import json

from pyspark.sql import SparkSession

# Each pipeline registers what it adds to releases of its tables (lib/privacy/hooks.py).
import jobs.cdr.release_hooks
import jobs.remote_sensing.release_hooks
import jobs.social.release_hooks  # noqa: F401
from lib.config import Config
from lib.privacy import guard, signing
from lib.privacy.policy import PolicyError
from lib.privacy.pseudonym import PseudonymKeyError
from lib.privacy.release import ReleaseError, release

DESCRIPTION = "Guard a gold table and export it: exports.<type>, files + manifest, audit.releases"
__all__ = ["ReleaseError", "add_arguments", "release", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release_type", help="a release type of conf/privacy.yaml, e.g. cdr_od")
    parser.add_argument("--requester", default=None, help="who asks for the release (default: the OS user)")
    parser.add_argument("--purpose", default=None,
                        help="what the release is for, in the requester's words (manifest and reviewer report)")
    parser.add_argument("--override-reason", default=None,
                        help="written reason to release under a policy without approval or below the floor")


def run(spark: SparkSession, cfg: Config, args: argparse.Namespace) -> int:
    try:
        out = release(spark, cfg, args.release_type, args.requester, args.override_reason, args.purpose)
    except (ReleaseError, PolicyError, guard.GuardError, signing.SigningKeyError, PseudonymKeyError) as exc:
        print(f"migralake: release refused: {exc}")
        return 4
    print(json.dumps(out, indent=2, default=str))
    return 0
