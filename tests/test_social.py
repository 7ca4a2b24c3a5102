"""Social-media pipeline: parsing and quarantine, flags, topic matching, the transformers path, the planted
sentiment shift, and no text or raw author id outside bronze."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.demo import cdr_synth, social_synth
from jobs.social import ingest, sentiment
from jobs.social import model as models
from lib.config import PROJECT_ROOT, SocialInput, load_config
from lib.privacy.pseudonym import pseudonymise_values
from lib.tables import Lakehouse

KEY = "test-key-0123456789abcdef0123456789"
START, DAYS, EVENT_DAY = date(2024, 3, 4), 28, 14
OFFLINE = PROJECT_ROOT / models.OFFLINE_DEFAULT
needs_offline_model = pytest.mark.skipif(
    not (OFFLINE / "model.safetensors").exists(),
    reason=f"{OFFLINE} not built (bin/setup builds it when ../shared/data/sentiment/umsab is present)")

CSV_ROWS = [  # (line, tweet_id, body, user, time, lon, lat) -- mapped through social.column_mapping
    "tweet_id,body,user,time,lon,lat",
    "9001,Refugees welcomed at the town hall today,555000111,2024-03-05T09:00:00Z,30.4,-0.5",
    "9002,too,many,fields,here,2024-03-05T09:00:00Z,1,2",
    "9003,Migrants at the border,555000112,2023-01-01T00:00:00Z,,",
    "9004,,555000113,2024-03-06T09:00:00Z,,",
]


def tiny_model(path: Path, id2label: dict[int, str]) -> Path:
    """A randomly initialised 2-layer BERT classifier with the MiniLM tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from jobs.social.train_model import encoder_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=len(id2label),
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    BertForSequenceClassification(config).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(encoder_dir(), local_files_only=True)
    tok.model_max_length = 64
    tok.save_pretrained(path)
    return path


def configure(tmp: Path, model: str, inputs: list[SocialInput], retention: int = 30, **social):  # type: ignore[no-untyped-def]
    for lvl in ("admin1", "admin2"):
        (tmp / f"{lvl}.geojson").write_text(json.dumps(cdr_synth.admin_geojson(lvl)))
    cfg = load_config(overrides=[f"lakehouse.root={tmp / 'lake'}", "period.start=2024-03-04",
                                 "period.end=2024-03-31"], env={"MIGRALAKE_PSEUDONYM_KEY": KEY})
    s = cfg.social.model_copy(update={"inputs": inputs, "model": model, "text_retention_days": retention,
                                      "admin_paths": {"admin1": str(tmp / "admin1.geojson")},
                                      "column_mapping": {"id": "tweet_id", "text": "body", "author_id": "user",
                                                         "created_at": "time", "longitude": "lon",
                                                         "latitude": "lat"}, **social})
    return cfg.model_copy(update={"social": s})


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory, monkeypatch_module):  # type: ignore[no-untyped-def]
    if not (OFFLINE / "model.safetensors").exists():
        pytest.skip(f"{OFFLINE} not built (bin/setup builds it from ../shared/data/sentiment/umsab)")
    tmp = tmp_path_factory.mktemp("social")
    truth = social_synth.generate(tmp / "synth", seed=11, n_authors=600, posts_per_author=4.0, start=START,
                                  n_days=DAYS, event_day=EVENT_DAY)
    (tmp / "csv").mkdir()
    (tmp / "csv" / "posts.csv").write_bytes("\n".join(CSV_ROWS).encode() + b"\n"
                                            + b"9005,caf\xe9 migrants,555000114,2024-03-07T09:00:00Z,,\n")
    cfg = configure(tmp, models.OFFLINE_DEFAULT, [SocialInput(path=str(tmp / "synth" / "posts")),
                                                  SocialInput(path=str(tmp / "csv"), format="csv")])
    monkeypatch_module.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    summary = ingest.ingest(spark, cfg)
    scored = sentiment.score(spark, cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    return cfg, truth, lake, summary, scored, tmp


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_parsing_and_every_quarantine_reason(world) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake, summary, _, _ = world
    q = lake.read("quarantine.social_posts").toPandas()
    reasons = q["reason"].value_counts().to_dict()
    expected = dict(truth["bad_lines"])
    expected.update({"bad_csv_row": 1, "outside_period": 1, "missing_text": 2, "invalid_utf8": 2})
    assert reasons == expected
    # the reasons hostile files bring (oversize, bad Unicode, unreadable files): tests/test_hostile_inputs.py
    assert set(ingest.REASONS) - {"invalid_unicode", "oversize", "unreadable_file"} == set(expected)
    row = q[q["reason"] == "bad_csv_row"].iloc[0]
    assert row["source_file"].endswith("posts.csv") and row["line_number"] == 3
    assert q[q["reason"] == "bad_json"]["detail"].str.contains("column").all()
    # rows in = accepted + quarantined; every good JSON post and the one good CSV row reach bronze
    n_good = truth["posts"] + truth["retweets"] + truth["duplicates"] + 1
    assert summary["accepted"] == n_good == lake.read("bronze.social_posts").count()
    assert summary["rows_in"] == n_good + len(q)
    bronze = lake.read("bronze.social_posts").toPandas()
    csv_post = bronze[bronze["source_file"].str.endswith("posts.csv")].iloc[0]
    assert csv_post["place_kind"] == "point" and (csv_post["longitude"], csv_post["latitude"]) == (30.4, -0.5)
    assert (bronze["place_kind"] == "bbox").sum() == truth["api_pages"]  # places from API pages' includes


def test_retweets_and_duplicates_flagged_and_not_counted(world) -> None:  # type: ignore[no-untyped-def]
    _, truth, lake, summary, _, tmp = world
    assert summary["retweets"] == truth["retweets"] and summary["duplicates"] == truth["duplicates"]
    planted = pd.read_csv(tmp / "synth" / "truth_posts.csv", dtype=str)
    counted_on_topic = planted["planted"].isin(["negative", "neutral", "positive"]).sum() + 1  # + the CSV post
    silver = lake.read("silver.social_posts")
    assert silver.filter("counted AND on_topic").count() == counted_on_topic
    national = lake.read("gold.social_sentiment").filter(
        "period = 'day' AND region = 'national' AND language = 'all'").agg(F.sum("n_posts")).first()[0]
    assert national == counted_on_topic


def test_topic_matching_is_multilingual_on_word_boundaries() -> None:
    m = sentiment.Matcher(sentiment.load_terms("conf/keywords/migration.yaml"))
    assert m.match("Los REFUGIADOS llegan hoy")[0] == ["refugiados"]
    assert m.match("nueva ley de migracion")[0] == ["migracion"]  # accent-insensitive
    assert m.match("Les réfugiés arrivent")[1] == ["fr"]
    assert m.match("Die Flüchtlinge kommen an")[0] == ["fluchtlinge"]
    assert m.match("#RefugeesWelcome in Berlin")[0] == ["#refugeeswelcome"]
    assert m.match("immigrants arrive")[0] == ["immigrants"]  # not 'migrants' inside 'immigrants'
    assert m.match("refugeesX and premigration")[0] == []  # no match inside longer words
    assert m.match("وصل اللاجِئين إلى المدينة")[0] == [sentiment.normalise("اللاجئين")]  # diacritics ignored
    assert m.match("ترحب باللاجئين")[0] == [sentiment.normalise("اللاجئين")]  # with the proclitic bi-
    assert m.match("تلاجئين")[0] == []
    assert m.match("शरणार्थियों की मदद")[0] == ["शरणार्थियों"]
    assert m.match("शरणार्थीकरण")[0] == []  # Devanagari word boundary
    assert m.match("Football tonight") == ([], [])


def test_transformers_path_with_a_tiny_model(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_model(tmp_path / "tiny", {0: "Positive", 1: "negative", 2: "NEUTRAL"})
    scorer = models.Scorer(str(path))
    assert scorer.order == [1, 2, 0] and scorer.max_length == 64
    texts = ["short", "a somewhat longer text about refugees " * 3, "word " * 500, "mid length post here"]
    one_batch = scorer.score(texts, batch_size=64)
    small = scorer.score(texts, batch_size=1)  # length-sorted batches: same numbers as one padded batch
    np.testing.assert_allclose(one_batch.p_positive, small.p_positive, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        p = torch.softmax(ref(**tok(texts[1], return_tensors="pt")).logits, -1)[0].numpy()
    assert one_batch.p_positive[1] == pytest.approx(p[0], abs=1e-5)
    assert one_batch.p_negative[1] == pytest.approx(p[1], abs=1e-5)
    assert one_batch.label[1] == ("positive", "negative", "neutral")[int(p.argmax())]
    assert len(models.weights_hash(str(path))) == 64

    assert models.resolve_precision("auto") == ("bf16" if models.native_bf16() else "fp32")
    with pytest.raises(models.ModelError, match="social.precision 'fp16'"):
        models.resolve_precision("fp16")

    with pytest.raises(models.ModelError, match="social.label_map"):
        models.label_order({0: "LABEL_0", 1: "LABEL_1"})
    assert models.label_order({0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": "negative", "LABEL_1": "positive"}) == [0, -1, 1]

    # On executors: one model load per Python worker, however many Arrow batches it scores.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "5")
    try:
        df = spark.range(200).repartition(2).selectExpr("cast(id as string) as text")

        def probe(batches):  # type: ignore[no-untyped-def]
            import os

            from jobs.social import model as m

            for b in batches:
                s = m.scorer_for(str(path))
                yield pd.DataFrame({"pid": [os.getpid()], "scorer": [id(s)], "n": [len(s.score(b["text"].tolist()).label)]})

        out = df.mapInPandas(probe, "pid long, scorer long, n long").toPandas()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert out["n"].sum() == 200 and len(out) >= 40
    assert (out.groupby("pid")["scorer"].nunique() == 1).all()


def test_workers_fork_from_a_preloaded_daemon_and_reuse_the_warmed_model(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lib import pydaemon

    path = tiny_model(tmp_path / "tiny", {0: "negative", 1: "neutral", 2: "positive"})
    job = sentiment.Scoring(terms={}, boundaries={}, unit="admin1", h3_res=7, max_km=0.0, model_name="tiny",
                            model_path=str(path), model_hash="", label_map={}, batch_size=8, threads=1,
                            precision="fp32", exclude_retweets=True, exclude_duplicates=True)

    def state(batches):  # type: ignore[no-untyped-def]
        import os
        import sys

        for _ in batches:
            pass
        with open(f"/proc/{os.getppid()}/maps") as f:  # the daemon this worker was forked from
            daemon_torch = "libtorch_cpu" in f.read()
        cache = sys.modules["jobs.social.model"]._CACHE if "jobs.social.model" in sys.modules else {}
        yield pd.DataFrame({"daemon": [os.getppid()], "daemon_torch": [daemon_torch],
                            "loaded": [any(k[0] == str(path) for k in cache)]})

    schema = "daemon int, daemon_torch boolean, loaded boolean"
    plain = spark.range(1, numPartitions=1).mapInPandas(state, schema).first()
    assert not plain["daemon_torch"] and not plain["loaded"]  # Spark's ordinary daemon imports nothing
    env = {pydaemon.PRELOAD_ENV: "jobs.social.model", models.PRELOAD_MODEL_ENV: str(path)}
    with pydaemon.worker_environment(spark, env):
        warm = sentiment.warm_workers(spark, 1, job)
        probe = spark.range(1, numPartitions=1).mapInPandas(state, schema)
    assert pydaemon.PRELOAD_ENV not in spark.sparkContext.environment  # restored for later functions
    warm.join()
    after = probe.first()
    # a daemon of its own that has torch loaded; the worker the warm-up loaded the model into is reused
    assert after["daemon"] != plain["daemon"] and after["daemon_torch"] and after["loaded"]
    again = spark.range(1, numPartitions=1).mapInPandas(state, schema).first()
    assert again["daemon"] == plain["daemon"] and not again["daemon_torch"]


def test_daemon_preload_imports_the_model_classes_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    path = tiny_model(tmp_path / "tiny", {0: "negative", 1: "neutral", 2: "positive"})
    code = ("import sys; from lib.pydaemon import preload; "
            "done = preload('jobs.social.model, no_such_module_here'); "
            "print(done, 'transformers.models.bert.modeling_bert' in sys.modules, "
            "len(sys.modules['jobs.social.model']._CACHE))")
    env = {**__import__("os").environ, "MIGRALAKE_SENTIMENT_MODEL": str(path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # imported, the model's module included, no weights loaded; a module that fails is reported and skipped
    assert out.stdout.split() == ["['jobs.social.model']", "True", "0"]
    assert "preloading no_such_module_here failed (ModuleNotFoundError" in out.stderr


@needs_offline_model
def test_offline_default_model_gets_obvious_english_right() -> None:
    scorer = models.Scorer(models.OFFLINE_DEFAULT)
    assert models.label_order(scorer.model.config.id2label) == [0, 1, 2]
    pos = ["I love this, what a wonderful day!", "Thank you so much, this is amazing and beautiful",
           "So happy and proud of our team, great job!"]
    neg = ["This is terrible, I hate it so much", "Worst service ever, disgusting and awful",
           "I am so angry and sad, this is a disaster"]
    s = scorer.score(pos + neg)
    assert list(s.label) == ["positive"] * 3 + ["negative"] * 3
    # bf16 autocast (the default on CPUs with native bfloat16) stays close to float32 and keeps the labels
    if scorer.precision == "fp32":
        scorer = models.Scorer(models.OFFLINE_DEFAULT, precision="bf16")
    assert scorer.precision == "bf16"
    b = scorer.score(pos + neg)
    fp = models.Scorer(models.OFFLINE_DEFAULT, precision="fp32").score(pos + neg)
    assert list(b.label) == list(fp.label) == list(s.label)
    np.testing.assert_allclose(b.p_positive, fp.p_positive, atol=0.03)
    assert not np.allclose(b.p_positive, fp.p_positive, atol=0, rtol=0)  # bf16 really ran
    report = json.loads((OFFLINE / "training_report.json").read_text())
    assert set(report["validation_macro_f1"]) >= {"english", "arabic", "hindi", "all"}


def test_planted_shift_appears_in_the_gold_series(world) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake, _, scored, _ = world
    assert scored["model_hash"] == models.weights_hash(models.OFFLINE_DEFAULT)
    silver = lake.read("silver.social_posts").filter("on_topic").toPandas()
    assert (silver["model_hash"] == scored["model_hash"]).all() and silver["sentiment"].notna().all()
    assert (silver["model_precision"] == models.resolve_precision(cfg.social.precision)).all()
    weeks = lake.read("gold.social_sentiment").filter("period = 'week' AND language = 'all'").toPandas()
    event = pd.Timestamp(truth["event_date"]).date()
    weeks["after"] = weeks["period_start"] >= event
    mean = weeks.groupby(["region", "after"]).apply(
        lambda g: np.average(g["mean_score"], weights=g["n_posts"]), include_groups=False).unstack()
    shift = mean[True] - mean[False]
    # planted: R1's on-topic posts go from 20% to 75% negative after the event; the other regions do not change
    assert shift["R1"] < -0.25, shift.to_dict()
    others = shift.drop(["R1", "national"])
    # the other regions move by sampling noise only (about 190 posts per region and side here): well under a
    # quarter of the planted shift
    assert (others.abs() < 0.25 * abs(shift["R1"])).all(), shift.to_dict()
    assert shift["R1"] < others.min() - 0.2
    neg = weeks[weeks["region"] == "R1"].groupby("after").apply(
        lambda g: np.average(g["share_negative"], weights=g["n_posts"]), include_groups=False)
    assert neg[True] - neg[False] > 0.2


def test_no_text_or_raw_author_id_outside_bronze(world) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake, _, _, tmp = world
    raw_authors, texts = set(), set()
    for f in sorted((tmp / "synth" / "posts").glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            for t in (obj.get("data") if isinstance(obj, dict) and "data" in obj else [obj]):
                if isinstance(t, dict) and len(str(t.get("author_id"))) >= 10 and t.get("text"):
                    raw_authors.add(str(t["author_id"]))
                    texts.add(t["text"])
    assert len(raw_authors) > 500
    root = Path(lake.root)
    bronze_dir = Path(lake.location("bronze.social_posts"))
    scanned = 0
    for path in root.rglob("*"):
        if not path.is_file() or bronze_dir in path.parents:
            continue
        data = path.read_bytes()
        scanned += 1
        assert not any(a.encode() in data for a in raw_authors), path
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for col in table.column_names:
                values = {str(v) for v in table.column(col).to_pylist() if isinstance(v, str)}
                assert not values & raw_authors and not values & texts, (path, col)
    assert scanned > 10
    bronze = lake.read("bronze.social_posts").select("author_key").distinct().toPandas()
    keyed = set(pseudonymise_values(pd.Series(sorted(raw_authors)), KEY.encode()))
    assert set(bronze["author_key"]) - {pseudonymise_values(pd.Series(["555000111"]), KEY.encode())[0]} <= keyed
    assert not set(bronze["author_key"]) & raw_authors


def test_text_retention_erases_text_and_its_files(spark, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "p.csv").write_text("\n".join(CSV_ROWS[:2] + [
        "9101,Asylum seekers wait at the border crossing,555000200,2024-03-08T10:00:00Z,30.2,-0.4",
        "9102,Lovely weather for a walk,555000201,2024-03-09T10:00:00Z,,"]) + "\n")
    model = tiny_model(tmp_path / "tiny", {0: "negative", 1: "neutral", 2: "positive"})
    cfg = configure(tmp_path, str(model), [SocialInput(path=str(tmp_path / "csv"), format="csv")], retention=0)
    ingest.ingest(spark, cfg)
    out = sentiment.score(spark, cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    assert out["text_erased"] == 3 and out["on_topic"] == 2
    bronze = lake.read("bronze.social_posts").toPandas()
    assert bronze["text"].isna().all() and bronze["text_erased_at"].notna().all()
    needles = [b"Asylum seekers wait", b"Lovely weather", b"Refugees welcomed"]
    files = [p for p in Path(lake.location("bronze.social_posts")).rglob("*") if p.is_file()]
    for p in files:  # the vacuumed data files are gone, and the log holds no statistics of the text
        assert not any(n in p.read_bytes() for n in needles), p
        if p.suffix == ".parquet":
            assert all(v is None for v in pq.read_table(p).column("text").to_pylist())
    # re-scoring after erasure keeps the scored rows (their text is gone, their silver rows stay)
    again = sentiment.score(spark, cfg)
    assert again["posts"] == 3 and again["on_topic"] == 2


def test_missing_model_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(models.ModelError, match="not a local directory"):
        models.weights_hash("migralake-tests/no-such-model")
    with pytest.raises(models.ModelError, match="does not exist"):
        models.Scorer(str(tmp_path / "no-model-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="no weight files"):
        models.weights_hash(str(tmp_path / "empty"))


def test_same_posts_give_the_same_scores_series_and_release_on_another_layout(world, spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Scored again from a copy of bronze with four times the tasks and another number of shuffle partitions:
    every probability equal to the last bit, the gold series equal, the released cells equal."""
    import shutil

    from lib.privacy import release as rel

    cfg, _, lake, _, _, _ = world
    root2 = tmp_path / "lake"
    shutil.copytree(Path(cfg.lakehouse.resolved_root()) / "bronze", root2 / "bronze")
    cfg2 = cfg.model_copy(update={
        "lakehouse": cfg.lakehouse.model_copy(update={"root": str(root2)}),
        "social": cfg.social.model_copy(update={"tasks_per_slot": 4 * cfg.social.tasks_per_slot})})
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    try:
        sentiment.score(spark, cfg2)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    lake2 = Lakehouse(spark, str(root2))
    cols = ["post_key", "sentiment", "p_negative", "p_neutral", "p_positive", "score"]
    a = lake.read("silver.social_posts").select(*cols).toPandas().sort_values("post_key").reset_index(drop=True)
    b = lake2.read("silver.social_posts").select(*cols).toPandas().sort_values("post_key").reset_index(drop=True)
    assert len(a) == len(b) and a["p_positive"].notna().sum() > 500
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    keys = ["period", "period_start", "spatial_unit", "region", "language"]
    ga = lake.read("gold.social_sentiment").toPandas().sort_values(keys).reset_index(drop=True)
    gb = lake2.read("gold.social_sentiment").toPandas().sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(ga, gb, check_exact=True)
    # The release, under the shipped policy without its cross-slice relations: this 2,400-post world is too
    # small for them (the guard refuses: a relation whose cells are all withheld would still pin a measure).
    import yaml

    policy = yaml.safe_load((PROJECT_ROOT / "conf" / "privacy.yaml").read_text())
    policy["release_types"]["social_sentiment"].pop("relations")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    cells = []
    for c, folder in ((cfg, tmp_path / "exports1"), (cfg2, tmp_path / "exports2")):
        c = c.model_copy(update={"lakehouse": c.lakehouse.model_copy(update={"exports_dir": str(folder)}),
                                 "privacy": c.privacy.model_copy(update={"policy_path": str(tmp_path / "policy.yaml")})})
        out = rel.release(spark, c, "social_sentiment")
        cells.append(pd.read_parquet(f"{out['path']}/cells.parquet").sort_values(keys).reset_index(drop=True))
    pd.testing.assert_frame_equal(cells[0], cells[1], check_exact=True)
