"""Keyed pseudonyms for subscriber and author identifiers (HMAC-SHA256, hex).

The key comes from an environment variable or a secrets file named in
``pseudonym`` settings, never from conf/ values or a table. Without a key a
job refuses to run; only the demo profile may generate a throwaway key, and it
says so.

Two equal implementations: ``pseudonymise_values`` (Python, for pandas code on
the executors, e.g. the social ingest) and ``with_pseudonyms`` (Spark columns
computed in the JVM, for event tables of any size). In the latter the key's
HMAC pads reach the executors as a one-row broadcast relation, data rather than
literals, so the key never appears in a query plan, the Spark UI or an event log.

Reads and writes no tables.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lib.config import PseudonymSettings
from lib.privacy.keyfiles import read_secret

log = logging.getLogger("migralake.privacy")
MIN_KEY_BYTES = 16
_BLOCK = 64  # SHA-256 block size
_IPAD, _OPAD = "__migralake_hmac_ipad", "__migralake_hmac_opad"


class PseudonymKeyError(RuntimeError):
    """No usable pseudonymisation key; the message says where one is looked for."""


def load_key(settings: PseudonymSettings, env: dict[str, str] | None = None) -> bytes:
    """Return the HMAC key from the environment variable or the secrets file."""
    env = dict(os.environ) if env is None else env
    raw, origin = read_secret(env, settings.key_env, settings.key_file, "pseudonym key", PseudonymKeyError)
    if not raw:
        if settings.demo_generate:
            raw = secrets.token_hex(32)
            os.environ[settings.key_env] = raw  # so every later stage of this run uses the same key
            log.warning(
                "no pseudonym key set: generated a throwaway demo key for this run only "
                "(set %s or pseudonym.key_file for real data)",
                settings.key_env,
            )
            origin = "generated demo key"
        else:
            raise PseudonymKeyError(
                f"no pseudonym key: set the environment variable {settings.key_env} "
                f"(at least {MIN_KEY_BYTES} bytes, e.g. `openssl rand -hex 32`) or point "
                "pseudonym.key_file at a secrets file outside the repository. Refusing to run."
            )
    key = raw.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"pseudonym key from {origin} is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def _pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


# Per Python worker: pseudonyms already computed, per key fingerprint. Event data repeats
# each subscriber's id many times, so most values are looked up rather than hashed.
_CACHE: dict[bytes, dict[str, str]] = {}
_CACHE_MAX = 2_000_000


def pseudonymise_values(values: pd.Series, key: bytes) -> pd.Series:
    """HMAC-SHA256 hex of each string value (None stays None); equal to ``hmac.new(key, v, sha256)``."""
    ipad, opad = _pads(key)
    inner0 = hashlib.sha256(ipad)
    outer0 = hashlib.sha256(opad)
    cache = _CACHE.setdefault(hashlib.sha256(b"migralake-cache" + key).digest(), {})
    if len(cache) > _CACHE_MAX:
        cache.clear()

    def one(value: str) -> str:
        hit = cache.get(value)
        if hit is None:
            inner = inner0.copy()
            inner.update(value.encode("utf-8"))
            outer = outer0.copy()
            outer.update(inner.digest())
            hit = cache[value] = outer.hexdigest()
        return hit

    codes, uniques = pd.factorize(values.astype(object).where(values.notna(), None))
    hashed = np.array([one(str(u)) for u in uniques] + [None], dtype=object)
    return pd.Series(hashed[codes], index=values.index, dtype=object)  # code -1 (missing) -> None


def with_pseudonyms(df: DataFrame, outputs: Mapping[str, Column | str], key: bytes) -> DataFrame:
    """``df`` plus one column per ``outputs`` entry: the HMAC-SHA256 hex of the value cast to string and
    trimmed (null stays null), equal to ``hmac.new(key, value, sha256).hexdigest()``.

    Computed in the JVM with Spark's SHA-256 over the HMAC construction
    H((K ^ opad) || H((K ^ ipad) || m)): no Python round trip per row. The two pads
    come from a one-row relation broadcast to every task and joined to each row.
    """
    ipad, opad = _pads(key)
    pads = df.sparkSession.createDataFrame([(bytearray(ipad), bytearray(opad))], f"{_IPAD} binary, {_OPAD} binary")

    def hmac_hex(col: Column | str) -> Column:
        value = F.encode(F.trim((F.col(col) if isinstance(col, str) else col).cast("string")), "UTF-8")
        inner = F.unhex(F.sha2(F.concat(F.col(_IPAD), value), 256))
        return F.sha2(F.concat(F.col(_OPAD), inner), 256)

    joined = df.crossJoin(F.broadcast(pads))
    return joined.select(*df.columns, *[hmac_hex(c).alias(n) for n, c in outputs.items()])

