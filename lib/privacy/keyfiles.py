"""Where a platform secret is looked for: an environment variable, else a secrets file.

Shared by the pseudonym key (lib/privacy/pseudonym.py) and the release signing
key (lib/privacy/signing.py); each decides what a missing secret means.

Reads no tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def read_secret(env: Mapping[str, str], env_name: str, file: str | None, what: str,
                error: type[Exception]) -> tuple[str | None, str]:
    """(the secret or None, where it came from); an unreadable file raises ``error`` naming it."""
    raw = env.get(env_name)
    origin = f"environment variable {env_name}"
    if not raw and file:
        path = Path(file)
        try:
            raw = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise error(f"{what} file {path}: cannot read it ({exc})") from None
        origin = f"key file {path}"
    return raw or None, origin
