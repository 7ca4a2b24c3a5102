"""Quick-look plots for releases: each pipeline draws its own release types.

``draw`` dispatches to ``jobs.<owner>.quicklook.draw`` and falls back to a
generic chart (released vs withheld cells per slice). Plots use only the
guarded cells: withheld cells are shown as withheld, never as zero.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lib.privacy.policy import ReleaseType  # noqa: E402


def draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    """Write a PNG at ``path``; return a one-line caption."""
    try:
        module = importlib.import_module(f"jobs.{rt.owner}.quicklook")
        return str(module.draw(release_type, rt, cells, path))
    except ModuleNotFoundError:
        return generic(release_type, rt, cells, path)


def generic(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    key = rt.slice_by[0] if rt.slice_by else None
    fig, ax = plt.subplots(figsize=(8, 4))
    if key:
        tab = cells.groupby([key, "status"]).size().unstack(fill_value=0)
        tab.plot(kind="bar", stacked=True, ax=ax)
    ax.set_title(f"{release_type}: cells by status")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"{release_type}: released and withheld cells per {key}"
