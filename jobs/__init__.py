"""migralake jobs: each is a module with ``run(spark, cfg)`` (see jobs/cli.py).

The registry below maps a job name to its module and a one-line description;
``./spark-submit.sh --help`` prints it without importing any job.
"""

from __future__ import annotations

JOBS: dict[str, tuple[str, str]] = {
    "demo": (
        "jobs.demo.main",
        "Generate synthetic inputs with a known truth and run every pipeline end to end",
    ),
    "cdr.ingest": (
        "jobs.cdr.ingest",
        "CDR event files + cells -> bronze.cdr_events (pseudonymised) and quarantine.cdr_events",
    ),
    "cdr.mobility": (
        "jobs.cdr.mobility",
        "bronze.cdr_events -> daily/home locations -> presence, OD flows, displacement (gold)",
    ),
    "remote_sensing.change": (
        "jobs.remote_sensing.change",
        "Satellite scenes (two or more dates) -> settlement change per H3 cell and admin area (gold) + COG",
    ),
    "remote_sensing.train": (
        "jobs.remote_sensing.train",
        "Labels + scenes -> a learned built-up classifier (model folder with data hashes and held-out scores)",
    ),
    "remote_sensing.accuracy": (
        "jobs.remote_sensing.accuracy",
        "Reference labels -> confusion matrix, user's/producer's accuracy, F1, area-adjusted km2 with 95% CI",
    ),
    "social.ingest": (
        "jobs.social.ingest",
        "Post files (X API v2 JSON Lines or CSV) -> bronze.social_posts (pseudonymised) + quarantine",
    ),
    "social.sentiment": (
        "jobs.social.sentiment",
        "bronze.social_posts -> language, migration topic, place, sentiment (silver) -> series (gold)",
    ),
    "release": (
        "jobs.release",
        "Guard a gold table and export it: exports.<type>, files + manifest, audit.releases",
    ),
    "audit": (
        "jobs.audit",
        "Review releases: audit list | verify <release-id> | report <release-id>",
    ),
    "tables": (
        "jobs.tables",
        "List the registered tables: location, current version, rows and description",
    ),
}
