"""What the social-media pipeline adds to releases of its tables: the sentiment series plot.

Registered under the owner name ``social`` when this module is imported (jobs/release.py does).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.privacy.hooks import ReleaseHooks, register
from lib.privacy.policy import ReleaseType


def _draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    from jobs.social import quicklook

    return quicklook.draw(release_type, rt, cells, path)


HOOKS = register("social", ReleaseHooks(draw=_draw))
