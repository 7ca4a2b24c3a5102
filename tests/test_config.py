"""Configuration: layering, and errors that name the source, the key and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.config import CONF_DIR, ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_layers_apply_in_order(tmp_path: Path) -> None:
    extra = write(tmp_path / "extra.yaml", "spark:\n  shuffle_partitions: 3\ncdr:\n  h3_resolution: 5\n")
    cfg = load_config(
        "demo",
        conf_files=[extra],
        overrides=["spark.shuffle_partitions=11", "lakehouse.root=" + str(tmp_path / "lh")],
        env={"MIGRALAKE__CDR__H3_RESOLUTION": "6", "MIGRALAKE__SPARK__LOG_LEVEL": "WARN"},
    )
    assert cfg.profile == "demo"
    assert cfg.spark.shuffle_partitions == 11  # --set beats the file
    assert cfg.cdr.h3_resolution == 6  # environment beats the file
    assert cfg.spark.log_level == "WARN"
    assert cfg.pseudonym.demo_generate is True  # from conf/demo.yaml
    assert cfg.lakehouse.resolved_root() == str(tmp_path / "lh")


def test_shipped_profiles_are_valid() -> None:
    for path in CONF_DIR.glob("*.yaml"):
        if path.stem in {"base", "privacy"}:
            continue
        load_config(path.stem, check_writable=False)
    cluster = load_config(None, conf_files=[CONF_DIR / "cluster.example.yaml"], check_writable=False)
    assert cluster.spark.master == "yarn"
    assert not cluster.lakehouse.is_local()


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "spark:\n  master: local[2]\n   shuffle_partitions: [\n")
    with pytest.raises(ConfigError) as err:
        load_config("demo", conf_files=[bad])
    msg = str(err.value)
    assert str(bad) in msg and "malformed YAML" in msg and "line " in msg


def test_unknown_key_names_file_key_and_choices(tmp_path: Path) -> None:
    bad = write(tmp_path / "typo.yaml", "spark:\n  shufle_partitions: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config("demo", conf_files=[bad])
    msg = str(err.value)
    assert f"{bad}: spark.shufle_partitions: unknown key" in msg
    assert "expected one of: master, app_name, shuffle_partitions" in msg


def test_wrong_type_names_the_set_argument() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides=["spark.shuffle_partitions=many"])
    msg = str(err.value)
    assert "--set spark.shuffle_partitions=many: spark.shuffle_partitions:" in msg
    assert "integer" in msg and "'many'" in msg


def test_wrong_type_from_environment() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", env={"MIGRALAKE__DEMO__N_DAYS": "1"})
    assert "env MIGRALAKE__DEMO__N_DAYS: demo.n_days" in str(err.value)
    assert "greater than or equal to 2" in str(err.value)


def test_unknown_profile_lists_profiles() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("nope")
    assert "profile 'nope'" in str(err.value) and "demo" in str(err.value)


def test_bad_set_syntax() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("demo", overrides=["spark.master"])


def test_period_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="period: .*end 2024-01-01 is before start 2024-02-01"):
        load_config("demo", overrides=["period.start=2024-02-01", "period.end=2024-01-01"])


def test_lakehouse_under_a_file_is_refused(tmp_path: Path) -> None:
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides=[f"lakehouse.root={afile}/lh"])
    assert "lakehouse.root" in str(err.value) and "not writable" in str(err.value)
