"""Keyed pseudonyms: equal to the standard HMAC, refused without a key."""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lib.config import PseudonymSettings
from lib.privacy.pseudonym import (
    PseudonymKeyError,
    load_key,
    pseudonymise_values,
    with_pseudonyms,
)

KEY = b"k" * 20
LONG_KEY = bytes(range(100))


@pytest.mark.parametrize("key", [KEY, LONG_KEY])
def test_matches_standard_hmac(key: bytes) -> None:
    values = pd.Series(["255700000001", "+44 7700", "", None])
    out = pseudonymise_values(values, key)
    for v, o in zip(values, out, strict=True):
        if v is None:
            assert o is None
        else:
            assert o == hmac.new(key, v.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("key", [KEY, LONG_KEY])
def test_spark_columns_match_trim_and_keep_the_key_out_of_plans(spark: SparkSession, key: bytes) -> None:
    df = spark.createDataFrame([(" 255700000001 ", "x"), (None, "ünï"), ("", None)], "msisdn string, other string")
    out = with_pseudonyms(df, {"a": "msisdn", "b": F.col("other")}, key)
    assert out.columns == ["msisdn", "other", "a", "b"]
    got = [(r["a"], r["b"]) for r in out.collect()]
    std = [hmac.new(key, v.encode(), hashlib.sha256).hexdigest() for v in ("255700000001", "x", "", "ünï")]
    assert got == [(std[0], std[1]), (None, std[3]), (std[2], None)]
    assert got[0][0] == pseudonymise_values(pd.Series(["255700000001"]), key)[0]  # both implementations agree
    plan = out._jdf.queryExecution().toString().lower()  # noqa: SLF001 - parsed, analysed, optimised, physical
    key_bytes = key if len(key) <= 64 else hashlib.sha256(key).digest()
    assert key_bytes.hex() not in plan and bytes(b ^ 0x36 for b in key_bytes).hex() not in plan
    assert with_pseudonyms(df, {"p": "msisdn"}, key).filter("p IS NOT NULL").count() == 2


def test_no_key_refuses() -> None:
    with pytest.raises(PseudonymKeyError, match="set the environment variable MY_KEY.*Refusing to run"):
        load_key(PseudonymSettings(key_env="MY_KEY"), env={})


def test_short_key_refused_and_file_key_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PseudonymKeyError, match="at least 16 are needed"):
        load_key(PseudonymSettings(key_env="MY_KEY"), env={"MY_KEY": "short"})
    secret = tmp_path / "key"
    secret.write_text("0123456789abcdef0123\n")
    assert load_key(PseudonymSettings(key_env="MY_KEY", key_file=str(secret)), env={}) == b"0123456789abcdef0123"


def test_demo_profile_generates_a_key(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MY_DEMO_KEY", raising=False)
    key = load_key(PseudonymSettings(key_env="MY_DEMO_KEY", demo_generate=True), env={})
    assert len(key) == 64
    import os

    assert os.environ["MY_DEMO_KEY"].encode() == key  # the same key for the rest of the run
